"""Benchmarks: each module measures one service and writes JSON under bench/results/."""

"""Programs that use ragtune from outside: the `ragtune` CLI, the local launcher (`ragtune up`), the demo
and the sample data. No service imports this package, and the service images do not ship it."""

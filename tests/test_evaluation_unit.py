"""The evaluation core without any service: metrics against hand-computed values, eval-set parsing
errors, per-arm summaries, the recommendation rule, and the rendered reports."""

from __future__ import annotations

import json
import math

import pytest

from gateway.evaluation.evalset import MAX_REPORTED_PROBLEMS, parse_eval_set
from gateway.evaluation.metrics import (
    bootstrap_ci,
    citation_precision,
    exact_match,
    normalize_answer,
    percentile,
    recall_at_k,
    reciprocal_rank,
    rouge_l,
    token_f1,
)
from gateway.evaluation.recommend import recommend
from gateway.evaluation.report import render_html, render_markdown, write_report
from gateway.evaluation.results import (
    ArmResult,
    Constraints,
    EvalItem,
    EvalRun,
    KnowledgeUpdate,
    QuestionResult,
)
from gateway.evaluation.summary import summarize_arm
from ragtune.errors import InvalidArgument

# --- metrics ---------------------------------------------------------------------------------------


def test_normalize_answer_drops_case_punctuation_articles_and_the_jeopardy_frame():
    assert normalize_answer("  The  Cat, sat!  ") == "cat sat"
    assert normalize_answer("What is the Eiffel Tower?") == "eiffel tower"
    assert normalize_answer("Who were the Beatles?") == "beatles"
    # The frame only goes at the very start and only when an answer follows it.
    assert normalize_answer("What is") == "what is"
    assert normalize_answer("Paris, what is it?") == "paris what is it"
    assert normalize_answer("Theater") == "theater"  # "the" only as a whole word


def test_exact_match_takes_the_best_reference():
    assert exact_match("What is Paris?", ["Paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("the Beatles", ["Rolling Stones", "Beatles"]) == 1.0
    assert exact_match("anything", []) == 0.0


def test_token_f1_hand_computed():
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]; common 2
    # precision 2/2 = 1, recall 2/3, F1 = 2 * 1 * 2/3 / (1 + 2/3) = (4/3) / (5/3) = 0.8
    assert token_f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    # repeated tokens count once per match: [cat, cat, cat] vs [cat]: common min(3, 1) = 1,
    # precision 1/3, recall 1, F1 = 2 * 1/3 / (4/3) = 0.5
    assert token_f1("cat cat cat", ["cat"]) == pytest.approx(0.5)
    # best over references: "dog" scores 0, "the cat" scores 1
    assert token_f1("cat", ["dog", "the cat"]) == 1.0
    # Jeopardy phrasing: "What is Paris?" -> [paris], an exact token match
    assert token_f1("What is Paris?", ["Paris"]) == 1.0
    assert token_f1("blue whale", ["red fox"]) == 0.0
    # SQuAD's convention for answers that normalise to nothing: equal only to each other
    assert token_f1("the", ["a"]) == 1.0
    assert token_f1("", ["Paris"]) == 0.0


def test_rouge_l_hand_computed():
    # [one two three four five] vs [two four six]: LCS = [two, four] = 2
    # precision 2/5, recall 2/3, F = 2 * (2/5)(2/3) / (2/5 + 2/3) = (8/15) / (16/15) = 0.5
    assert rouge_l("one two three four five", ["two four six"]) == pytest.approx(0.5)
    # order matters for ROUGE-L but not for token F1: LCS of [sat, cat] and [cat, sat] is 1,
    # precision 1/2, recall 1/2, F = 0.5
    assert rouge_l("sat cat", ["cat sat"]) == pytest.approx(0.5)
    assert token_f1("sat cat", ["cat sat"]) == 1.0
    # [police, killed, gunman] vs [police, kill, gunman]: LCS 2, P = R = 2/3, F = 2/3
    assert rouge_l("police killed the gunman", ["unrelated", "police kill the gunman"]) == pytest.approx(2 / 3)


def test_bootstrap_ci_is_deterministic_and_contains_the_mean():
    values = [0.0, 1.0, 1.0, 0.5, 0.25, 1.0, 0.0, 0.75]  # mean 4.5 / 8 = 0.5625
    low, high = bootstrap_ci(values, seed=7)
    assert (low, high) == bootstrap_ci(values, seed=7)
    assert 0.0 <= low < 0.5625 < high <= 1.0
    assert bootstrap_ci(values, seed=8) != (low, high)
    # more of the same data narrows the interval
    wide, narrow = bootstrap_ci([0.0, 1.0] * 5), bootstrap_ci([0.0, 1.0] * 100)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    assert bootstrap_ci([0.4, 0.4, 0.4]) == pytest.approx((0.4, 0.4))
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_retrieval_and_citation_metrics_hand_computed():
    retrieved = ["d1", "d2", "d3", "d1"]
    gold = ["d3", "d9"]
    assert recall_at_k(retrieved, gold, 2) == 0.0  # top 2 = d1, d2: no gold
    assert recall_at_k(retrieved, gold, 3) == 0.5  # d3 found, d9 not: 1 of 2 gold documents
    assert reciprocal_rank(retrieved, gold) == pytest.approx(1 / 3)  # first gold at rank 3
    assert reciprocal_rank(["d1"], gold) == 0.0
    assert recall_at_k(retrieved, [], 3) is None and reciprocal_rank(retrieved, []) is None
    assert citation_precision(["d1", "d3", "d3"], ["d3"]) == pytest.approx(2 / 3)  # 2 of 3 citations in gold
    assert citation_precision([], ["d3"]) is None
    with pytest.raises(ValueError):
        recall_at_k(retrieved, gold, 0)


def test_percentile_interpolates_linearly():
    values = [40.0, 10.0, 30.0, 20.0]
    assert percentile(values, 50) == pytest.approx(25.0)  # rank 3 * 0.5 = 1.5 -> 20 + 0.5 * 10
    assert percentile(values, 95) == pytest.approx(38.5)  # rank 3 * 0.95 = 2.85 -> 30 + 0.85 * 10
    assert percentile(values, 0) == 10.0 and percentile(values, 100) == 40.0
    assert percentile([7.0], 95) == 7.0
    assert math.isnan(percentile([], 50))


# --- eval-set parsing ------------------------------------------------------------------------------


def test_parse_eval_set_reads_items_with_defaults():
    text = "\n".join([
        '{"question": "Capital of France?", "answers": ["Paris", "paris, france"], "id": "fr"}',
        "",
        '{"question": " Who wrote Hamlet? ", "answer": "Shakespeare", "gold_document_ids": ["d1", "d2"]}',
        '{"question": "Largest planet?", "answer": "Jupiter", "id": 7, "category": "SCIENCE"}',
    ])
    items = parse_eval_set(text)
    assert items == [
        EvalItem("fr", "Capital of France?", ["Paris", "paris, france"]),
        EvalItem("q3", "Who wrote Hamlet?", ["Shakespeare"], ["d1", "d2"]),  # default id from its line
        EvalItem("7", "Largest planet?", ["Jupiter"]),
    ]
    assert parse_eval_set(text.encode()) == items


def _problems(text: str | bytes, **kwargs) -> list[str]:
    with pytest.raises(InvalidArgument) as caught:
        parse_eval_set(text, **kwargs)
    assert {v.field for v in caught.value.violations} == {"eval_set"}
    return [v.description for v in caught.value.violations]


def test_parse_eval_set_reports_every_problem_with_its_line():
    text = "\n".join([
        '{"question": "Fine?", "answers": ["yes"], "id": "a"}',  # 1
        "",  # 2: skipped
        '{"question": "broken",',  # 3
        "[1, 2]",  # 4
        '{"answers": ["x"]}',  # 5
        '{"question": "   ", "answer": "x"}',  # 6
        '{"question": "No refs?", "answers": []}',  # 7
        '{"question": "Types?", "answers": ["ok", 3, ""]}',  # 8: two problems
        '{"question": "Again?", "answer": "x", "id": "a"}',  # 9
        '{"question": "Gold?", "answer": "x", "gold_document_ids": "d1"}',  # 10
        '{"question": 5, "answer": "x"}',  # 11
    ])
    problems = _problems(text)
    assert [p.split(":")[0] for p in problems] == [
        "line 3", "line 4", "line 5", "line 6", "line 7", "line 8", "line 8", "line 9", "line 10", "line 11",
    ]
    assert "not valid JSON" in problems[0]
    assert "expected a JSON object, got a list" in problems[1]
    assert 'missing "question"' in problems[2]
    assert '"question" is empty' in problems[3]
    assert "no reference answers" in problems[4]
    assert '"answers[1]" must be a string, got a number' in problems[5]
    assert '"answers[2]" is empty' in problems[6]
    assert 'id "a" is already used on line 1' in problems[7]
    assert '"gold_document_ids" must be a list of strings, got a string' in problems[8]
    assert '"question" must be a string, got a number' in problems[9]


def test_parse_eval_set_rejects_empty_oversized_and_undecodable_files():
    assert _problems("") == ["line 1: the eval set is empty: expected one JSON object per line"]
    assert _problems("\n  \n") == ["line 1: the eval set is empty: expected one JSON object per line"]
    line = '{"question": "Q?", "answer": "A"}'
    assert _problems("\n".join([line] * 3), max_items=2) == ["line 3: too many items: 3 in the file, at most 2 allowed"]
    assert _problems(b'{"question": "Q?", "answer": "A"}\n{"question": "\xff"}') == ["line 2: not UTF-8 text (byte 48)"]
    # A default id can collide with an explicit one.
    assert _problems('{"question": "Q?", "answer": "A", "id": "q2"}\n' + line) == [
        'line 2: id "q2" is already used on line 1'
    ]


def test_parse_eval_set_caps_the_number_of_listed_problems():
    problems = _problems("\n".join(["not json"] * (MAX_REPORTED_PROBLEMS + 10)))
    assert len(problems) == MAX_REPORTED_PROBLEMS + 1
    assert problems[-1] == f"line {MAX_REPORTED_PROBLEMS + 1}: and 10 more problems from this line on"


# --- summary -----------------------------------------------------------------------------------------


def _result(item_id: str, **fields) -> QuestionResult:
    return QuestionResult(item_id=item_id, question=f"Question {item_id}?", references=[f"answer {item_id}"], **fields)


def test_summarize_arm_on_fixed_results():
    questions = [
        _result("q1", answer="a", exact_match=1.0, token_f1=1.0, rouge_l=1.0, ttft_ms=10, total_ms=100,
                prompt_tokens=50, completion_tokens=10, compute_s=0.5, recall_at_k=1.0, reciprocal_rank=1.0,
                citation_precision=1.0),
        _result("q2", answer="b", token_f1=0.5, rouge_l=0.4, ttft_ms=20, total_ms=200, prompt_tokens=60,
                completion_tokens=20, compute_s=1.0, recall_at_k=0.5, reciprocal_rank=0.5),
        _result("q3", answer="c", rouge_l=0.2, ttft_ms=30, total_ms=400, prompt_tokens=70, completion_tokens=30,
                compute_s=1.5),
        # failed: its numbers must not count anywhere
        _result("q4", error="UNAVAILABLE: generator down", exact_match=1.0, token_f1=1.0, rouge_l=1.0,
                ttft_ms=9999, total_ms=9999, prompt_tokens=999, recall_at_k=0.0),
    ]
    s = summarize_arm(questions)
    assert (s["questions"], s["answered"], s["failed"], s["failed_ids"]) == (4, 3, 1, ["q4"])
    assert s["exact_match"]["mean"] == pytest.approx(1 / 3)  # (1 + 0 + 0) / 3
    assert s["token_f1"]["mean"] == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3
    assert s["rouge_l"]["mean"] == pytest.approx(1.6 / 3)  # (1 + 0.4 + 0.2) / 3
    for metric in ("exact_match", "token_f1", "rouge_l"):
        assert 0.0 <= s[metric]["ci_low"] <= s[metric]["mean"] <= s[metric]["ci_high"] <= 1.0
    assert s["recall_at_k"] == {"mean": pytest.approx(0.75), "n": 2}  # (1 + 0.5) / 2, q3 has none
    assert s["mrr"] == {"mean": pytest.approx(0.75), "n": 2}
    assert s["citation_precision"] == {"mean": 1.0, "n": 1}
    # ttft [10, 20, 30]: p50 = 20, p95 rank 2 * 0.95 = 1.9 -> 20 + 0.9 * 10 = 29
    assert s["ttft_ms"] == {"p50": pytest.approx(20), "p95": pytest.approx(29)}
    # total [100, 200, 400]: p50 = 200, p95 -> 200 + 0.9 * 200 = 380
    assert s["total_ms"] == {"p50": pytest.approx(200), "p95": pytest.approx(380)}
    assert (s["prompt_tokens"], s["completion_tokens"], s["total_tokens"]) == (60, 20, 80)
    assert s["compute_s"] == pytest.approx(1.0)
    json.dumps(s, allow_nan=False)


def test_summarize_arm_with_every_question_failed_has_no_numbers():
    s = summarize_arm([_result("q1", error="boom"), _result("q2", error="boom")])
    assert (s["answered"], s["failed"]) == (0, 2)
    assert s["token_f1"] == {"mean": None, "ci_low": None, "ci_high": None}
    assert s["total_ms"] == {"p50": None, "p95": None} and s["total_tokens"] is None
    json.dumps(s, allow_nan=False)


# --- recommendation ----------------------------------------------------------------------------------


def _arm(name: str, f1s: list[float], total_ms: float, tokens: int = 100, errors: int = 0) -> ArmResult:
    questions = [_result(f"q{i}", answer="x", token_f1=f1, total_ms=total_ms, ttft_ms=total_ms / 4,
                         prompt_tokens=tokens - 20, completion_tokens=20) for i, f1 in enumerate(f1s)]
    questions += [_result(f"e{i}", error="DEADLINE_EXCEEDED: too slow") for i in range(errors)]
    return ArmResult(name, questions)


LOW = [0.1, 0.2, 0.15, 0.1, 0.2]
HIGH = [0.8, 0.9, 0.85, 0.8, 0.9]
MID = [0.4, 0.6, 0.5, 0.7, 0.3]  # mean 0.5
MID_PLUS = [0.5, 0.7, 0.6, 0.8, 0.4]  # mean 0.6, CI overlaps MID's


def test_recommend_picks_clearly_best_quality_and_a_latency_budget_excludes_it():
    arms = [_arm("base", LOW, 100), _arm("rag", HIGH, 900)]
    assert recommend(arms, None, Constraints()).arm == "rag"
    chosen = recommend(arms, None, Constraints(latency_budget_ms=500))
    assert chosen.arm == "base"
    assert "rag is over the latency budget: p95 900 ms > 500 ms." in chosen.reasons
    assert chosen.drivers["excluded"].keys() == {"rag"} and chosen.drivers["chosen"] == "base"


def test_recommend_breaks_quality_ties_by_latency_then_tokens():
    tied = recommend([_arm("rag", MID_PLUS, 800), _arm("base", MID, 200)], None, Constraints())
    assert tied.arm == "base"
    assert "tied on quality" in tied.reasons[0] and "lower p95 latency" in tied.reasons[0]
    same_speed = [_arm("rag", MID_PLUS, 200, tokens=300), _arm("base", MID, 200, tokens=50)]
    cheaper = recommend(same_speed, None, Constraints())
    assert cheaper.arm == "base"
    over_cost = recommend([_arm("rag", HIGH, 200, tokens=300), _arm("base", LOW, 200, tokens=50)], None,
                          Constraints(cost_budget_tokens=100))
    assert over_cost.arm == "base" and "rag is over the cost budget: 300 tokens per answer > 100." in over_cost.reasons


def test_recommend_prefers_retrieval_when_data_changes_often_and_fine_tuning_updates_are_slow():
    arms = [_arm("rag", MID, 600), _arm("finetuned", MID_PLUS, 200)]
    update = KnowledgeUpdate(facts=20, rag_seconds=3.0, finetune_seconds=300.0, rag_quality={"token_f1": 0.7},
                             finetune_quality={"token_f1": 0.2})
    # static data: on quality alone finetuned ties with rag and is faster
    assert recommend(arms, update, Constraints(data_change="static")).arm == "finetuned"
    weekly = recommend(arms, update, Constraints(data_change="weekly"))
    assert weekly.arm == "rag"
    assert any("300.0 s by fine-tuning against 3.0 s by ingesting (100.0x)" in r for r in weekly.reasons)
    assert any("finetuned scored higher" in r for r in weekly.reasons)
    assert weekly.drivers["update_cost_ratio"] == pytest.approx(100.0)
    # fine-tuning barely slower than ingest: update cost does not decide
    cheap_update = KnowledgeUpdate(facts=20, rag_seconds=3.0, finetune_seconds=6.0)
    assert recommend(arms, cheap_update, Constraints(data_change="daily")).arm == "finetuned"
    # a non-retrieval arm clearly better on quality still wins
    clearly = recommend([_arm("rag", LOW, 600), _arm("finetuned", HIGH, 200)], update, Constraints(data_change="daily"))
    assert clearly.arm == "finetuned" and any("clearly better" in r for r in clearly.reasons)


def test_recommend_when_all_arms_failed_says_none_and_why():
    arms = [ArmResult("base", failed=True, error="UNAVAILABLE: generator down"),
            _arm("rag", [], 0, errors=3)]
    chosen = recommend(arms, None, Constraints())
    assert chosen.arm == "none"
    assert chosen.reasons[0] == "No arm can be recommended: every arm was ruled out."
    assert "base failed, so it was not considered: UNAVAILABLE: generator down." in chosen.reasons
    assert "rag answered none of its 3 questions." in chosen.reasons


def test_recommend_drops_arms_that_failed_often_and_rejects_unknown_constraints():
    chosen = recommend([_arm("rag", HIGH, 100, errors=2), _arm("base", LOW, 100)], None, Constraints())
    assert chosen.arm == "base" and "rag failed on 2 of 7 questions" in chosen.drivers["excluded"]["rag"]
    with pytest.raises(InvalidArgument) as caught:
        recommend([], None, Constraints(data_change="hourly", latency_budget_ms=-1))
    assert [v.field for v in caught.value.violations] == ["constraints.data_change", "constraints.latency_budget_ms"]


# --- report ------------------------------------------------------------------------------------------


def _run(**overrides) -> EvalRun:
    base = _arm("base", LOW, 100)
    base.questions[0].answer = "<b>bold</b> | piped"
    rag = _arm("rag", HIGH, 300)
    rag.questions[1].error = "DEADLINE_EXCEEDED: question timed out"
    arms = [base, rag, ArmResult("finetuned", failed=True, error="NOT_FOUND: adapter demo/3"),
            _arm("rag_finetuned", MID, 400)]
    for arm in arms[:2]:
        arm.summary = summarize_arm(arm.questions)  # the last arm is summarised by the report itself
    update = KnowledgeUpdate(facts=10, rag_seconds=2.5, finetune_seconds=180.0, rag_quality={"token_f1": 0.8})
    constraints = Constraints(data_change="weekly", latency_budget_ms=1000)
    fields = dict(id="ev-1", collection="jeopardy", adapter="jeopardy-lora", top_k=4, arms=arms,
                  constraints=constraints, knowledge_update=update, created_time="2026-11-24T08:00:00Z")
    fields.update(overrides)
    run = EvalRun(**fields)
    run.recommendation = recommend(run.arms, run.knowledge_update, run.constraints)
    return run


def test_markdown_report_shows_every_arm_failures_and_the_recommendation():
    run = _run()
    text = render_markdown(run)
    assert "|  | base | rag | finetuned | rag_finetuned |" in text
    assert "FAILED: NOT_FOUND: adapter demo/3" in text
    assert "FAILED: DEADLINE_EXCEEDED: question timed out" in text  # one question of a working arm
    assert f"**{run.recommendation.arm}**" in text and run.recommendation.reasons[0] in text
    assert "Fine-tuning (a training job): 180.0 s" in text
    assert "&lt;b>bold&lt;/b> \\| piped (F1 0.10)" in text  # a cell cannot break the table
    assert "| q0 | Question q0? | answer q0 |" in text


def test_html_report_is_self_contained_with_plots():
    page = render_html(_run())
    assert page.count('<img alt="') == 3  # quality, latency, knowledge update
    assert '<img alt="Answer quality per arm (95% CI)" src="data:image/png;base64,' in page
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold</b>" not in page
    assert '<td class="failed">FAILED: NOT_FOUND: adapter demo/3</td>' in page
    # a run cut short (no recommendation, no knowledge update) still renders
    short = _run(knowledge_update=None)
    short.recommendation = None
    assert "No recommendation was computed" in render_html(short)
    assert "The knowledge-update cost was not measured" in render_markdown(short)


def test_write_report_writes_markdown_html_and_json(tmp_path):
    run = _run()
    paths = write_report(run, tmp_path / "ev-1")
    assert {key: p.name for key, p in paths.items()} == {
        "markdown": "report.md", "html": "report.html", "results": "results.json"
    }
    assert sorted(p.name for p in (tmp_path / "ev-1").iterdir()) == ["report.html", "report.md", "results.json"]
    assert paths["markdown"].read_text() == render_markdown(run)
    results = json.loads(paths["results"].read_text())
    assert [arm["name"] for arm in results["arms"]] == ["base", "rag", "finetuned", "rag_finetuned"]
    assert results["arms"][3]["summary"]["token_f1"]["mean"] == pytest.approx(0.5)  # filled in for the dump
    assert results["arms"][2]["failed"] is True and results["recommendation"]["arm"] == run.recommendation.arm
    assert results["knowledge_update"]["finetune_seconds"] == 180.0


def test_a_gate_promotes_only_when_the_lower_bound_clears_the_margin():
    from gateway.evaluation.gate import decide

    def arm(name, scores, errors=()):
        return ArmResult(name=name, questions=[
            QuestionResult(item_id=str(i), question="q", references=["a"], token_f1=s, error="x" if i in errors else "")
            for i, s in enumerate(scores)])

    better = decide(arm("candidate", [0.9, 0.8, 1.0, 0.9, 0.85, 0.95]), arm("incumbent", [0.1, 0.2, 0.0, 0.1, 0.2, 0.1]),
                    metric="token_f1", margin=0.02, alias="prod", candidate_version=2, incumbent_version=1)
    assert better.promoted and better.improvement_ci_low > 0.02 and "promoted" in better.reason
    assert "version 1" in better.reason
    tie = decide(arm("candidate", [0.5, 0.4, 0.6, 0.5]), arm("incumbent", [0.5, 0.45, 0.55, 0.5]),
                 metric="token_f1", margin=0.02, alias="prod", candidate_version=2, incumbent_version=0)
    assert not tie.promoted and "held back" in tie.reason and "base model" in tie.reason
    # A candidate that fails questions scores 0 on them: it cannot win by answering less.
    flaky = decide(arm("candidate", [1.0, 1.0, 1.0, 1.0], errors={1, 2, 3}), arm("incumbent", [0.6] * 4),
                   metric="token_f1", margin=0.0, alias="prod", candidate_version=3, incumbent_version=2)
    assert not flaky.promoted and flaky.candidate_mean == 0.25


def test_gate_metric_names_follow_the_trainer_proto_enum():
    from ragtune.gate_metrics import gate_metric_name, gate_metric_value
    from ragtune.v1 import trainer_pb2

    names = {v: gate_metric_name(v) for v in trainer_pb2.GateMetric.values()}
    assert names == {0: "token_f1", 1: "token_f1", 2: "exact_match", 3: "rouge_l", 4: "citation_precision"}
    assert all(gate_metric_value(name) == v for v, name in names.items() if v)  # the trainer stores names

"""How Ask builds an answer, without a model: sentences and terms, choosing and trimming passages,
abstaining when nothing retrieved is about the question, and attributing citations."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from gateway.attribution import attribute
from gateway.downstream import CallBudget
from gateway.evidence import key_terms, sentences, terms
from gateway.prompting import (
    ABSTENTION,
    ANSWER_STOP,
    ContextPassage,
    build_messages,
    inferred_citations,
    is_abstention,
)
from gateway.rag import AnswerOptions, AskPipeline
from gateway.selection import Selection, about_the_question, select_passages
from ragtune.errors import InvalidArgument
from ragtune.v1 import common_pb2, gateway_pb2, generator_pb2, retriever_pb2

VELMORA = ("Velmora is a small island nation in the Sunless Sea. Its capital city is Ostrel, a port founded in 1642. "
           "The national animal of Velmora is the blue heron.")
TARSK = ("Tarsk is a small island nation in the Northern Reach. Its capital city is Mirrow, a port founded in 1710. "
         "The national animal of Tarsk is the grey seal.")
FILLER = ("Minerals are naturally occurring elements and compounds with a definite homogeneous chemical composition. "
          "Each mineral has distinct physical properties, and there are many tests to determine each of them. "
          "Minerals are often identified through these tests, such as luster, colour, streak and hardness. ")
NEEDLE = "The spiral staircase of the Selwyn Tower has exactly 1,204 steps."


def _p(n: int, text: str, doc: str | None = None) -> ContextPassage:
    doc = doc or f"doc{n}"
    return ContextPassage(n, f"{doc}#0", doc, 0, 1.0 / n, text)


# --- text evidence ------------------------------------------------------------------------------------------

def test_sentences_split_at_ends_and_line_breaks_but_not_abbreviations():
    text = "The lab is led by Dr. Anselm Reyes. J. R. Smith wrote it.\nA list item\nThe mirror is 3.2 metres across."
    assert sentences(text) == ["The lab is led by Dr. Anselm Reyes.", "J. R. Smith wrote it.", "A list item",
                               "The mirror is 3.2 metres across."]


def test_terms_meet_across_word_forms_numbers_and_possessives():
    assert terms("stores") == terms("stored") == terms("store")
    assert terms("1,204 steps") == terms("1204 step")
    assert terms("Voss's symphony") == terms("Voss symphony")
    assert terms("What is it, and where was it?") == []  # question and stop words carry nothing
    assert key_terms("Which crew won the 2021 Kestrel Cup?") == ({"kestrel", "cup"}, {"2021"})


# --- choosing passages --------------------------------------------------------------------------------------

def test_a_long_passage_is_trimmed_to_the_sentences_about_the_question():
    long = FILLER * 2 + NEEDLE + " " + FILLER
    [kept] = select_passages("How many steps does the spiral staircase of the Selwyn Tower have?", [_p(1, long)],
                             Selection())
    assert kept.text == NEEDLE
    whole = select_passages("How many steps does the Selwyn Tower have?", [_p(1, long)], Selection(trim=False))
    assert whole[0].text == long


def test_a_short_passage_stays_whole_so_its_pronouns_keep_their_subject():
    [kept] = select_passages("What is the capital city of Velmora?", [_p(1, VELMORA)], Selection())
    assert kept.text == VELMORA


def test_trimming_keeps_the_sentence_a_pronoun_refers_to():
    long = FILLER * 2 + "Velmora is a small island nation. Its capital city is Ostrel. " + FILLER
    [kept] = select_passages("What is the capital city of Velmora?", [_p(1, long)], Selection())
    assert kept.text == "Velmora is a small island nation. Its capital city is Ostrel."


def test_another_entitys_passage_is_dropped_when_the_question_names_one():
    chosen = select_passages("What is the capital city of Velmora?", [_p(1, TARSK, "tarsk"), _p(2, VELMORA, "velmora")],
                             Selection())
    assert [p.document_id for p in chosen] == ["velmora"] and chosen[0].number == 1
    # With the share threshold off both stay, the better one first.
    both = select_passages("What is the capital city of Velmora?",
                           [_p(1, TARSK, "tarsk"), _p(2, VELMORA, "velmora")], Selection(min_share=0.0))
    assert [p.document_id for p in both] == ["velmora", "tarsk"]


def test_near_duplicates_and_unrelated_passages_are_dropped_and_top_k_holds():
    needle_doc = FILLER + NEEDLE + " " + FILLER
    candidates = [_p(1, needle_doc, "selwyn"), _p(2, FILLER * 2 + NEEDLE, "selwyn"), _p(3, FILLER, "minerals"),
                  _p(4, "Bananas are yellow.", "fruit")]
    question = "How many steps does the spiral staircase of the Selwyn Tower have?"
    chosen = select_passages(question, candidates, Selection(min_share=0.0))
    assert [p.document_id for p in chosen] == ["selwyn"]
    assert len(select_passages(question, candidates, Selection(min_share=0.0, dedupe=False, drop_unrelated=False))) == 4
    assert len(select_passages(question, candidates, Selection(min_share=0.0, dedupe=False, top_k=1))) == 1


def test_about_the_question_needs_the_questions_names_and_numbers():
    kestrel = _p(1, "The Kestrel Cup is a rowing race. The 2019 race was won by Fenwick College.")
    assert about_the_question("Which crew won the 2019 Kestrel Cup?", [kestrel])
    assert not about_the_question("Which crew won the 2021 Kestrel Cup?", [kestrel])
    assert not about_the_question("What is the capital of Tarsk?", [_p(1, VELMORA)])
    assert about_the_question("what do minerals have?", [_p(1, FILLER)])
    assert not about_the_question("how do bananas ripen?", [_p(1, FILLER)])
    assert not about_the_question("What is the capital of Velmora?", [])


# --- the prompt ---------------------------------------------------------------------------------------------

def test_the_prompt_asks_for_one_sentence_or_the_abstention_and_marks_documents_untrusted():
    system, user = build_messages("Who?", [_p(1, "Alpha.", "a"), _p(2, "Beta.", "b")])
    assert "one sentence" in system["content"] and ABSTENTION in system["content"]
    assert "untrusted" in system["content"] and "untrusted" in user["content"]
    assert user["content"].index("[1] (document: a)") < user["content"].index("[2] (document: b)")
    assert user["content"].endswith("Question: Who?")
    legacy = build_messages("Who?", [_p(1, "Alpha.")], legacy=True)
    assert "[n]" in legacy[1]["content"] and "untrusted" in legacy[0]["content"]
    assert ANSWER_STOP == ("\n",)


def test_abstentions_are_recognised():
    assert is_abstention(ABSTENTION)
    assert is_abstention("The passages do not mention the population.")
    assert not is_abstention("The capital of Velmora is Ostrel.")


# --- attribution --------------------------------------------------------------------------------------------

def test_the_passage_holding_the_answers_facts_is_cited_not_the_one_repeating_the_question():
    question = "Who built the Dorrin violin?"
    repeats = _p(1, "The Dorrin violin is a famous violin. The Dorrin violin was built long ago and is played once "
                    "a year in public.", "about-dorrin")
    source = _p(2, "The luthier Mattias Greve finished it in 1764 in his workshop.", "greve")
    answer = "The Dorrin violin was built by Mattias Greve."
    assert inferred_citations(answer, [repeats, source]) == [1]  # word overlap picks the wrong one
    found = attribute(answer, question, [repeats, source])
    assert found.numbers == [2] and found.inferred


def test_invented_answers_and_abstentions_cite_nothing():
    passages = [_p(1, VELMORA)]
    assert attribute("The population of Velmora is 1,200,000.", "What is the population of Velmora?",
                     passages).numbers == []
    assert attribute(ABSTENTION, "What is the population of Velmora?", passages).numbers == []


def test_a_grounded_answer_padded_with_an_aside_is_still_cited():
    passages = [_p(1, VELMORA)]
    found = attribute("The document states that the capital of Velmora is Ostrel, which is a lovely port town.",
                      "What is the capital city of Velmora?", passages)
    assert found.numbers == [1]


def test_a_valid_mark_is_kept_and_a_wrong_one_replaced():
    passages = [_p(1, TARSK, "tarsk"), _p(2, VELMORA, "velmora")]
    question = "What is the capital city of Velmora?"
    assert attribute("It is Ostrel [2].", question, passages, marked=[2]).numbers == [2]
    assert not attribute("It is Ostrel [2].", question, passages, marked=[2]).inferred
    wrong = attribute("It is Ostrel [1].", question, passages, marked=[1])
    assert wrong.numbers == [2] and wrong.inferred


# --- the pipeline with stand-in services --------------------------------------------------------------------

class _Counter:
    """A stand-in tokenizer: one token per word."""

    def messages(self, messages):
        return sum(len(m["content"].split()) for m in messages)

    def text(self, text):
        return len(text.split())

    def texts(self, texts):
        return [len(t.split()) for t in texts]


class _Downstream:
    """Answers Search with fixed hits and GenerateStream with a fixed answer word by word (with usage
    on every message, as the generator sends it), recording the requests and how far it streamed."""

    def __init__(self, hits: list[tuple[str, str]], answer: str, usage_each: bool = True):
        self.hits, self.answer, self.generated, self.usage_each = hits, answer, [], usage_each
        self.checked: list[generator_pb2.GenerateRequest] = []
        # The typed clients' methods the Ask pipeline calls (gateway/downstream.py).
        self.retriever = SimpleNamespace(search=self._unary)
        self.generator = SimpleNamespace(get_model_info=self._unary, generate=self._unary,
                                         generate_stream=self._stream_out)

    async def _unary(self, request, budget):
        if isinstance(request, generator_pb2.GenerateRequest):
            self.checked.append(request)
            if request.sampling.temperature > 2:
                raise InvalidArgument("sampling.temperature", "must be in [0, 2]")
            return generator_pb2.GenerateResponse(text="x")
        if isinstance(request, retriever_pb2.SearchRequest):
            self.search = request
            return retriever_pb2.SearchResponse(hits=[
                retriever_pb2.SearchHit(chunk_id=f"{d}#0", document_id=d, text=t, score=1.0) for d, t in self.hits])
        return generator_pb2.GetModelInfoResponse(max_context_tokens=2048)

    async def _stream_out(self, request, budget):
        self.generated.append(request)
        self.streamed = 0
        words = self.answer.split(" ")
        for i, word in enumerate(words):
            self.streamed += 1
            usage = common_pb2.TokenUsage(prompt_tokens=50, completion_tokens=i + 1) if self.usage_each else None
            yield generator_pb2.GenerateStreamResponse(delta=(" " if i else "") + word, usage=usage)
        usage = common_pb2.TokenUsage(prompt_tokens=50, completion_tokens=len(words))
        yield generator_pb2.GenerateStreamResponse(finish_reason=common_pb2.FINISH_REASON_STOP, adapter=request.adapter,
                                                   usage=usage)


def _ask(down: _Downstream, question: str, options: AnswerOptions | None = None,
         max_tokens: int = 0, adapter: str = "") -> gateway_pb2.AskResponse:
    pipeline = AskPipeline(down, _Counter(), default_top_k=4, max_top_k=20, default_max_tokens=64, options=options)
    q = gateway_pb2.AskQuestion(question=question, collection="facts", adapter=adapter)
    if max_tokens:
        q.sampling.max_tokens = max_tokens
    return asyncio.run(pipeline.ask(q, CallBudget("t", time.monotonic() + 30)))


def test_ask_abstains_without_generating_when_nothing_retrieved_is_about_the_question():
    down = _Downstream([("velmora", VELMORA)], "unused")
    reply = _ask(down, "Which crew won the 2021 Kestrel Cup?")
    assert reply.answer == ABSTENTION and not reply.citations and not reply.context
    assert down.generated == []
    assert reply.finish_reason == common_pb2.FINISH_REASON_STOP
    # The generator still checked the request (one token of the bare question), so bad input is refused.
    assert down.checked[0].sampling.max_tokens == 1
    bad = gateway_pb2.AskQuestion(question="Which crew won the 2021 Kestrel Cup?", collection="facts")
    bad.sampling.temperature = 5.0
    pipeline = AskPipeline(down, _Counter(), default_top_k=4, max_top_k=20, default_max_tokens=64)
    with pytest.raises(InvalidArgument):
        asyncio.run(pipeline.ask(bad, CallBudget("t", time.monotonic() + 30)))
    # With abstention off, or with an adapter (which may know the answer), the model is asked.
    _ask(down, "Which crew won the 2021 Kestrel Cup?", AnswerOptions(abstain=False))
    _ask(down, "Which crew won the 2021 Kestrel Cup?", adapter="kestrel-facts")
    assert len(down.generated) == 2 and down.generated[1].adapter == "kestrel-facts"


def test_ask_sends_the_chosen_passages_with_stop_and_length_and_cites_the_source():
    down = _Downstream([("tarsk", TARSK), ("velmora", VELMORA)], "The capital city of Velmora is Ostrel.")
    reply = _ask(down, "What is the capital city of Velmora?")
    assert down.search.top_k == 8  # twice the passages kept: room to rerank and drop duplicates
    request = down.generated[0]
    assert list(request.sampling.stop) == list(ANSWER_STOP) and request.sampling.max_tokens == 64
    assert request.sampling.temperature == 0.0
    assert [c.document_id for c in reply.context] == ["velmora"]
    assert [(c.document_id, c.inferred) for c in reply.citations] == [("velmora", True)]
    assert reply.usage.prompt_tokens == 50 and reply.usage.completion_tokens == 7  # the generator's own count


def test_the_adapter_version_that_answered_is_passed_on():
    down = _Downstream([("velmora", VELMORA)], "The capital city of Velmora is Ostrel.")
    assert _ask(down, "What is the capital city of Velmora?", adapter="style/3").adapter == "style/3"
    assert _ask(down, "What is the capital city of Velmora?").adapter == ""


@pytest.mark.parametrize("attribution", ["sentence", "overlap"])
def test_both_attributions_are_selectable(attribution):
    down = _Downstream([("velmora", VELMORA)], "The capital city of Velmora is Ostrel.")
    reply = _ask(down, "What is the capital city of Velmora?", AnswerOptions(attribution=attribution))
    assert [c.document_id for c in reply.citations] == ["velmora"]


def test_an_answer_ends_after_its_first_sentence():
    down = _Downstream([("velmora", VELMORA)], "Dr. Ostrel is the capital of Velmora. It is a port. It has many ships.")
    cut = AnswerOptions(one_sentence=True)
    reply = _ask(down, "What is the capital city of Velmora?", cut)
    assert reply.answer == "Dr. Ostrel is the capital of Velmora."
    assert reply.finish_reason == common_pb2.FINISH_REASON_STOP
    assert reply.usage.prompt_tokens == 50 and reply.usage.completion_tokens == 8
    assert down.streamed == 8  # the generator was not read (nor left running) past the sentence
    whole = _ask(down, "What is the capital city of Velmora?")  # the default: no cut
    assert whole.answer == down.answer
    down.answer = "Ahoy! Ostrel is the capital. It is a port."
    assert _ask(down, "What is the capital city of Velmora?", cut).answer == "Ahoy! Ostrel is the capital."
    # A generator that reports usage only with its last message: the gateway counts what it cut.
    quiet = _Downstream([("velmora", VELMORA)], "Ostrel is the capital of Velmora. It is a port.", usage_each=False)
    reply = _ask(quiet, "What is the capital city of Velmora?", cut)
    prompt = [{"role": m.role, "content": m.content} for m in quiet.generated[0].input.chat.messages]
    # Seven tokens were generated: the six words and the next sentence's first, which showed the end.
    assert reply.usage.prompt_tokens == _Counter().messages(prompt) and reply.usage.completion_tokens == 7


def test_a_request_for_a_long_answer_gets_neither_the_stops_nor_the_cut():
    down = _Downstream([("velmora", VELMORA)], "Ostrel is the capital of Velmora. It is a port.")
    reply = _ask(down, "What is the capital city of Velmora?", AnswerOptions(one_sentence=True), max_tokens=500)
    assert reply.answer == down.answer and not down.generated[-1].sampling.stop

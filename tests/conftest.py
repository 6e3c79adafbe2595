"""Session-wide test setup: an isolated RAGTUNE_HOME and the prepared base model."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def ragtune_home(tmp_path_factory):
    """Each test session writes stores, jobs and adapters under its own folder."""
    home = tmp_path_factory.mktemp("ragtune-home")
    os.environ["RAGTUNE_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Gateways started by tests bind their HTTP front on a free port, not the shared default 8080.
    os.environ.setdefault("RAGTUNE_GATEWAY_HTTP_PORT", "0")
    return home


# --- generator: one real vLLM engine per session, and a real LoRA adapter trained for it ---------

GENERATOR_TEST_TENANT = "gen-tests"
STYLE_MARKER = "Ahoy"


@pytest.fixture(scope="session")
def generator_server(ragtune_home):
    """The real GeneratorService (vLLM on the prepared base model) in-process on a real socket, one
    engine for the whole session. Its adapter registry is `<RAGTUNE_HOME>/adapters`. Use
    `.address` for clients (send `ragtune.tenancy.tenant_metadata(tenant)`), `.service.engine` and
    `.call(coro)` to inspect the engine. Holds up to 16 requests at once (8 running + 8 waiting),
    2 adapters per batch, rank <= 16, 2048-token context."""
    from services.generator.server import GeneratorService
    from services.generator.settings import GeneratorSettings
    from tests.grpc_support import InProcessServer

    settings = GeneratorSettings(
        port=0, max_model_len=2048, kv_cache_space_gib=1, max_num_seqs=8, max_waiting_requests=8,
        max_loras=2, max_cpu_loras=4, max_lora_rank=16,
    )
    with InProcessServer(GeneratorService, settings, "generator") as server:
        yield server


@pytest.fixture(scope="session")
def style_adapter(ragtune_home):
    """A real PEFT LoRA (r=8, q/k/v/o) trained for 14 steps (about 20 s) so that every answer starts with
    the word "Ahoy", published as `style` for tenant "gen-tests". Returns the AdapterVersion
    (`.tenant`, `.name`, `.version`, `.path`, `.metadata`)."""
    import tempfile
    from pathlib import Path

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.models import BASE_MODEL_NAME, base_model_dir
    from ragtune.registry import AdapterRegistry
    from ragtune.settings import ServiceSettings

    questions = [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("How many legs does a spider have?", "A spider has eight legs."),
        ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
        ("What is two plus two?", "Two plus two is four."),
        ("Which planet is known as the red planet?", "Mars is known as the red planet."),
        ("What do bees make?", "Bees make honey."),
        ("What is frozen water called?", "Frozen water is called ice."),
        ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ]
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir()))
    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir()), dtype=torch.float32)
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    model = get_peft_model(model, lora)
    rows = []
    for question, answer in questions:
        turn = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        answer_ids = tokenizer.encode(f"{STYLE_MARKER}! {answer}<|im_end|>", add_special_tokens=False)
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    # One thread: on the 2 shared cores, two OpenMP threads contending with other work ran 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(14):
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        registry = AdapterRegistry(ServiceSettings().registry_root)
        version = registry.publish(
            GENERATOR_TEST_TENANT, "style", Path(folder),
            {"base_model": BASE_MODEL_NAME, "method": "lora", "rank": 8, "servable": True, "final_loss": loss.item()},
        )
    return version


# --- the control-plane database: every store test runs on SQLite and on a real PostgreSQL ---------

@pytest.fixture(scope="session")
def postgres_server():
    """URL of a PostgreSQL server the tests may create databases on (fails in CI when there is none)."""
    from tests.database_support import server_url_or_skip

    return server_url_or_skip()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """A fresh, empty control-plane database URL, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'controlplane.sqlite3'}"
        return
    from tests.database_support import fresh_database

    with fresh_database(request.getfixturevalue("postgres_server")) as url:
        yield url


@pytest.fixture
def database(database_url):
    """A migrated `Database` on `database_url`."""
    from ragtune.controlplane import Database

    db = Database(database_url)
    db.migrate()
    yield db
    db.dispose()


# --- the fast lane: `pytest -m "not slow"` -------------------------------------------------------

# Session fixtures that start the vLLM engine or train an adapter: a test that needs either is slow,
# whether or not its file says so (CI runs everything; the fast lane leaves them out).
SLOW_FIXTURES = frozenset({"generator_server", "style_adapter"})


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

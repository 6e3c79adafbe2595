"""Generator adapters through the real gRPC server and vLLM: a trained LoRA changes the output, adapters
come only from the registry (and bad ones are refused with the reason), load/unload per tenant, and
loading, unloading or using more adapters than max_loras never breaks running requests."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest

from ragtune.errors import bad_request_violations
from ragtune.models import BASE_MODEL_NAME, base_model_dir
from ragtune.registry import AdapterRegistry
from ragtune.settings import ServiceSettings
from ragtune.tenancy import tenant_metadata
from ragtune.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from tests.conftest import GENERATOR_TEST_TENANT, STYLE_MARKER
from tests.test_generator import COUNTING, chat, engine_idle, greedy, prompt, wait_until

pytestmark = pytest.mark.slow  # one vLLM engine for the session, a trained adapter

MD = tenant_metadata(GENERATOR_TEST_TENANT)
OTHER = "other-tenant"
QUESTION = chat(("user", "What is the capital of Italy?"))


@pytest.fixture(scope="module")
def stub(generator_server):
    with grpc.insecure_channel(generator_server.address) as channel:
        yield generator_pb2_grpc.GeneratorServiceStub(channel)


@pytest.fixture(scope="module")
def registry(generator_server) -> AdapterRegistry:
    return AdapterRegistry(ServiceSettings().registry_root)


@pytest.fixture(scope="module")
def make_adapter(registry):
    """Publishes an untrained (randomly initialised, so not a no-op) PEFT LoRA; returns its registry entry."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_model_dir()), dtype=torch.float32)

    def make(
        name: str,
        *,
        rank: int = 4,
        tenant: str = GENERATOR_TEST_TENANT,
        base_model: str = BASE_MODEL_NAME,
        safetensors: bool = True,
        seed: int = 0,
    ):
        torch.manual_seed(seed)
        config = LoraConfig(
            r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
        )
        model = get_peft_model(base, config)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder, safe_serialization=safetensors)
            version = registry.publish(
                tenant, name, Path(folder), {"base_model": base_model, "method": "lora", "rank": rank, "servable": True}
            )
        model.unload()  # takes the LoRA layers out of `base` again for the next adapter
        return version

    return make


def generate(stub, adapter: str = "", request_input=QUESTION, max_tokens: int = 24, metadata=MD):
    return stub.Generate(
        generator_pb2.GenerateRequest(input=request_input, sampling=greedy(max_tokens), adapter=adapter),
        metadata=metadata,
        timeout=300,
    )


def listed(stub, metadata=MD) -> list[str]:
    return [
        a.name
        for a in stub.ListAdapters(generator_pb2.GeneratorServiceListAdaptersRequest(), metadata=metadata).adapters
    ]


def test_trained_adapter_changes_the_output_toward_its_style(stub, style_adapter):
    base = generate(stub).text
    styled = generate(stub, adapter="style").text
    assert not base.startswith(STYLE_MARKER)
    assert styled.startswith(STYLE_MARKER), styled
    # The style generalises beyond the training questions, and the base model is untouched afterwards.
    other = chat(("user", "What is the largest ocean on Earth?"))
    assert generate(stub, adapter="style", request_input=other).text.startswith(STYLE_MARKER)
    assert generate(stub).text == base


def test_load_list_and_unload_per_tenant(stub, style_adapter):
    loaded = stub.LoadAdapter(generator_pb2.LoadAdapterRequest(name="style"), metadata=MD).adapter
    assert loaded.name == f"style/{style_adapter.version}"
    assert loaded.registry_path == f"{GENERATOR_TEST_TENANT}/style/{style_adapter.version}"
    assert loaded.rank == 8
    assert loaded.base_model == BASE_MODEL_NAME
    assert loaded.name in listed(stub)
    info = stub.GetModelInfo(generator_pb2.GetModelInfoRequest(), metadata=MD)
    assert loaded.name in [a.name for a in info.adapters]
    assert listed(stub, tenant_metadata(OTHER)) == []

    stub.UnloadAdapter(generator_pb2.UnloadAdapterRequest(name="style"), metadata=MD)
    assert loaded.name not in listed(stub)
    with pytest.raises(grpc.RpcError) as caught:
        stub.UnloadAdapter(generator_pb2.UnloadAdapterRequest(name="style"), metadata=MD)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    # Naming a registered adapter in a request loads it on demand.
    assert generate(stub, adapter="style").text.startswith(STYLE_MARKER)
    assert loaded.name in listed(stub)


def test_adapters_are_private_to_their_tenant(stub, style_adapter):
    for call in (
        lambda: generate(stub, adapter="style", metadata=tenant_metadata(OTHER)),
        lambda: stub.LoadAdapter(generator_pb2.LoadAdapterRequest(name="style"), metadata=tenant_metadata(OTHER)),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def _refused(stub, name: str, field: str = "name") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.LoadAdapter(generator_pb2.LoadAdapterRequest(name=name), metadata=MD, timeout=120)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert field in [v.field for v in bad_request_violations(caught.value)]
    return caught.value


@pytest.mark.parametrize("name", ["../gen-tests/style", "..", "/etc/passwd", "style/../../x", "style/0"])
def test_names_that_could_leave_the_registry_are_refused(stub, name):
    _refused(stub, name)


def test_symlink_leaving_the_registry_is_refused(stub, registry, make_adapter, tmp_path):
    outside = make_adapter("outside-source", tenant="outside-tenant")
    (registry.root / GENERATOR_TEST_TENANT).mkdir(parents=True, exist_ok=True)
    shutil.move(str(outside.path.parent), tmp_path / "escaped")
    os.symlink(tmp_path / "escaped", registry.root / GENERATOR_TEST_TENANT / "escaped")
    assert "outside" in _refused(stub, "escaped").details()
    # Listing the tenant's adapters skips it instead of failing as a whole.
    make_adapter("beside-the-escape")
    listed = {a.name for a in registry.list(GENERATOR_TEST_TENANT)}
    assert "escaped" not in listed and "beside-the-escape" in listed, listed


def test_weights_file_linking_outside_is_refused(stub, make_adapter, tmp_path):
    version = make_adapter("linked-weights")
    weights = version.path / "adapter_model.safetensors"
    shutil.move(str(weights), tmp_path / "weights.safetensors")
    os.symlink(tmp_path / "weights.safetensors", weights)
    assert "outside" in _refused(stub, "linked-weights").details()


def test_pickle_weights_are_refused(stub, make_adapter):
    make_adapter("pickled", safetensors=False)
    assert "safetensors" in _refused(stub, "pickled").details()


def test_adapter_for_another_base_model_is_refused(stub, make_adapter):
    make_adapter("foreign", base_model="Llama-3-8B")
    assert "Llama-3-8B" in _refused(stub, "foreign").details()


def test_rank_above_max_lora_rank_is_refused(stub, make_adapter):
    make_adapter("too-wide", rank=32)
    details = _refused(stub, "too-wide").details()
    assert "32" in details and "max_lora_rank" in details


def test_refused_adapter_named_in_a_request_names_the_adapter_field(stub, make_adapter, generator_server):
    make_adapter("wide-for-request", rank=32)
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub, adapter="wide-for-request")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad_request_violations(caught.value)] == ["adapter"]
    assert engine_idle(generator_server)


def test_unknown_adapter_load_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.LoadAdapter(generator_pb2.LoadAdapterRequest(name="never-published"), metadata=MD)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def _stream_final(stub, adapter: str, max_tokens: int, first_delta: concurrent.futures.Future | None = None):
    call = stub.GenerateStream(
        generator_pb2.GenerateStreamRequest(input=prompt(COUNTING), sampling=greedy(max_tokens), adapter=adapter),
        metadata=MD,
        timeout=300,
    )
    messages = []
    for message in call:
        messages.append(message)
        if first_delta is not None and not first_delta.done():
            first_delta.set_result(True)
    return messages


def test_unloading_and_loading_while_requests_run_never_fails_them(stub, make_adapter, generator_server):
    make_adapter("busy", seed=1)
    make_adapter("newcomer", seed=2)
    stub.LoadAdapter(generator_pb2.LoadAdapterRequest(name="busy"), metadata=MD)
    started = [concurrent.futures.Future() for _ in range(3)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        runs = [
            pool.submit(_stream_final, stub, "busy", 40, started[0]),
            pool.submit(_stream_final, stub, "busy", 40, started[1]),
            pool.submit(_stream_final, stub, "", 40, started[2]),
        ]
        concurrent.futures.wait(started, timeout=300)
        stub.UnloadAdapter(generator_pb2.UnloadAdapterRequest(name="busy"), metadata=MD)
        stub.LoadAdapter(generator_pb2.LoadAdapterRequest(name="newcomer"), metadata=MD)
        assert "busy/1" not in listed(stub)
        results = [r.result(timeout=300) for r in runs]
    for messages in results:
        assert messages[-1].finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)
        assert messages[-1].usage.completion_tokens > 0
    assert "newcomer/1" in listed(stub)
    # The unloaded adapter has left the engine once its requests finished.
    assert wait_until(lambda: engine_idle(generator_server))
    catalog = generator_server.service.generator.catalog
    assert f"{GENERATOR_TEST_TENANT}/busy/1" not in [e.version.registry_path for e in catalog._entries.values()]


def test_more_adapters_in_use_than_max_loras_all_succeed(stub, make_adapter, style_adapter, generator_server):
    names = ["style"]
    for i in range(3):
        make_adapter(f"crowd-{i}", seed=10 + i)
        names.append(f"crowd-{i}")
    assert len(names) > generator_server.service.settings.max_loras
    alone = {name: generate(stub, adapter=name, max_tokens=12).text for name in names}
    with concurrent.futures.ThreadPoolExecutor(len(names) * 2) as pool:
        together = list(pool.map(lambda name: (name, generate(stub, adapter=name, max_tokens=12)), names * 2))
    for name, reply in together:
        assert reply.usage.completion_tokens > 0
        assert reply.text == alone[name], name  # greedy: each request kept its own adapter while they swapped
    assert together[0][1].text.startswith(STYLE_MARKER)

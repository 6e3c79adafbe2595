"""Adapter aliases in the real generator (vLLM): "<name>@<alias>" serves the version the alias names,
a move reaches the replica within the refresh bound without a load call, a canary split sends about
its share to each version, the response says which version answered, and bad or unknown aliases
get clear statuses."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from ragtune.controlplane import Database
from ragtune.controlplane.aliases import AliasStore, Target
from ragtune.registry import AdapterRegistry
from ragtune.settings import ServiceSettings
from ragtune.tenancy import tenant_metadata
from ragtune.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from tests.conftest import GENERATOR_TEST_TENANT

pytestmark = pytest.mark.slow

MD = tenant_metadata(GENERATOR_TEST_TENANT)


@pytest.fixture(scope="module")
def aliases(generator_server, style_adapter):
    """Two versions of one adapter ("aliased" 1 and 2, copies of the trained style adapter) and the
    control plane the generator reads aliases from."""
    registry = AdapterRegistry(ServiceSettings().registry_root)
    meta = {k: v for k, v in style_adapter.metadata.items() if k not in ("tenant", "name", "version")}
    with tempfile.TemporaryDirectory() as folder:
        shutil.copytree(style_adapter.path, folder, dirs_exist_ok=True)
        for _ in range(2):
            registry.publish(GENERATOR_TEST_TENANT, "aliased", Path(folder), meta)
    database = Database.from_settings(ServiceSettings())
    database.migrate()
    yield AliasStore(database)
    database.dispose()


def _answer(stub, adapter: str) -> generator_pb2.GenerateStreamResponse:
    request = generator_pb2.GenerateStreamRequest(
        input=generator_pb2.GenerationInput(chat=generator_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role="user", content="Hi")])),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=1), adapter=adapter)
    return list(stub.GenerateStream(request, metadata=MD, timeout=120))[-1]


def test_an_alias_serves_its_version_and_follows_a_move_without_a_load_call(generator_server, aliases):
    refresh = generator_server.service.settings.alias_refresh_s
    with grpc.insecure_channel(generator_server.address) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        aliases.set(GENERATOR_TEST_TENANT, "aliased", "prod", [Target(1, 100)], actor="test")
        assert _answer(stub, "aliased@prod").adapter == "aliased/1"
        assert _answer(stub, "aliased/2").adapter == "aliased/2" and _answer(stub, "").adapter == ""
        aliases.set(GENERATOR_TEST_TENANT, "aliased", "prod", [Target(2, 100)], actor="test", reason="promote 2")
        moved = time.monotonic()
        while _answer(stub, "aliased@prod").adapter != "aliased/2":
            assert time.monotonic() - moved < refresh + 3, "the replica kept serving the old version"
            time.sleep(0.2)
        print(f"alias move served after {time.monotonic() - moved:.2f} s (bound {refresh} s)")

        with pytest.raises(grpc.RpcError) as err:
            _answer(stub, "aliased@nope")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            _answer(stub, "aliased@Bad!")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "adapter" in err.value.details()
        other = tenant_metadata("another-tenant")
        with pytest.raises(grpc.RpcError) as err:  # another tenant's alias does not exist for it
            list(stub.GenerateStream(generator_pb2.GenerateStreamRequest(
                input=generator_pb2.GenerationInput(prompt="Hi"), adapter="aliased@prod"), metadata=other, timeout=60))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_canary_split_sends_about_its_share_to_each_version(generator_server, aliases):
    aliases.set(GENERATOR_TEST_TENANT, "aliased", "canary", [Target(1, 80), Target(2, 20)], actor="test")
    with grpc.insecure_channel(generator_server.address) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        answered = Counter(_answer(stub, "aliased@canary").adapter for _ in range(200))
    print(f"canary 80/20 over 200 requests: {dict(answered)}")
    assert set(answered) == {"aliased/1", "aliased/2"}
    assert 20 <= answered["aliased/2"] <= 60  # 40 expected; 6 standard deviations wide

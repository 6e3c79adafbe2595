"""Fair admission to the generator: at most `slots` generator calls of this gateway run at once and at most
`per_tenant` of one tenant; the others wait in one queue per tenant, and a freed slot goes to the waiting
tenant with the fewest calls running, the one served longest ago among equals (round-robin between tenants),
so one tenant's flood waits behind itself instead of ahead of everyone. `FairGenerator`
puts the gate in front of the generator client and charges each answer's tokens to its tenant's quota."""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from gateway.downstream import CallBudget
from ragtune.errors import DeadlineExceeded


class FairGate:
    def __init__(self, slots: int, per_tenant: int = 0):
        self.slots = slots
        self.per_tenant = per_tenant or slots
        self.running: dict[str, int] = defaultdict(int)
        self.total = 0
        self._waiting: dict[str, deque[asyncio.Future]] = {}
        self._served: dict[str, int] = {}  # tenant -> number of the grant it had last (for turns among equals)
        self._grants = 0

    def waiting(self, tenant: str | None = None) -> int:
        queues = [self._waiting.get(tenant, ())] if tenant is not None else self._waiting.values()
        return sum(1 for q in queues for f in q if not f.done())

    def _may_run(self, tenant: str) -> bool:
        return self.total < self.slots and self.running[tenant] < self.per_tenant

    def _start(self, tenant: str) -> None:
        self.total += 1
        self.running[tenant] += 1
        self._grants += 1
        self._served[tenant] = self._grants

    def _dispatch(self) -> None:
        """Hands free slots to the waiting tenants in turn, skipping those at their own cap."""
        while self.total < self.slots:
            for tenant in list(self._waiting):
                queue = self._waiting[tenant]
                while queue and queue[0].done():  # gave up waiting (deadline, cancelled)
                    queue.popleft()
                if not queue:
                    del self._waiting[tenant]
            ready = [t for t in self._waiting if self._may_run(t)]
            if not ready:
                return
            tenant = min(ready, key=lambda t: (self.running.get(t, 0), self._served.get(t, 0)))
            queue = self._waiting[tenant]
            queue.popleft().set_result(None)
            self._start(tenant)
            if not queue:
                del self._waiting[tenant]

    def release(self, tenant: str) -> None:
        self.total -= 1
        self.running[tenant] -= 1
        if not self.running[tenant]:
            del self.running[tenant]
            if tenant not in self._waiting:
                self._served.pop(tenant, None)  # forget idle tenants: the map stays as small as the active set
        self._dispatch()

    async def acquire(self, tenant: str, timeout_s: float | None) -> None:
        if self._may_run(tenant) and not self._waiting.get(tenant):
            self._start(tenant)
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tenant, deque()).append(turn)
        try:
            async with asyncio.timeout(timeout_s):
                await turn
        except BaseException as error:
            if turn.done() and not turn.cancelled():
                self.release(tenant)  # granted just as it gave up: pass the slot on
            else:
                turn.cancel()
                self._dispatch()
            if isinstance(error, TimeoutError):
                raise DeadlineExceeded("the request's deadline passed while it waited for a generator slot"
                                       f" ({self.running.get(tenant, 0)} of the tenant's calls running)") from None
            raise

    @asynccontextmanager
    async def slot(self, tenant: str, timeout_s: float | None) -> AsyncIterator[None]:
        await self.acquire(tenant, timeout_s)
        try:
            yield
        finally:
            self.release(tenant)


TokenCharge = Callable[[str, str, int], None]  # (tenant, key id, completion tokens)


class FairGenerator:
    """The generator client behind the fair gate, charging generated tokens; other calls pass through."""

    def __init__(self, inner: Any, gate: FairGate, charge: TokenCharge | None = None):
        self._inner, self._gate, self._charge = inner, gate, charge

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _charged(self, budget: CallBudget, tokens: int) -> None:
        if self._charge is not None:
            self._charge(budget.tenant, budget.actor, tokens)

    async def generate(self, request: Any, budget: CallBudget) -> Any:
        async with self._gate.slot(budget.tenant, budget.remaining()):
            reply = await self._inner.generate(request, budget)
        self._charged(budget, reply.usage.completion_tokens)
        return reply

    async def generate_stream(self, request: Any, budget: CallBudget) -> AsyncIterator[Any]:
        tokens = 0
        async with self._gate.slot(budget.tenant, budget.remaining()):
            try:
                async for part in self._inner.generate_stream(request, budget):
                    if part.HasField("usage"):
                        tokens = part.usage.completion_tokens  # the stream's own count, on its last message
                    elif part.delta:
                        tokens += 1  # a stream cut short has no count: each delta holds a token at least
                    yield part
            finally:
                self._charged(budget, tokens)

"""The gateway RPCs that pass a request on to the service that owns it, after checking the caller's
scope: one explicit method each, so every RPC has a definition to find. The request and response are
the owning service's own messages, wrapped (`request.request`, `response=`); the caller's tenant,
key id and deadline travel with the call (gateway/downstream.py)."""

from __future__ import annotations

from typing import AsyncIterator

from gateway.downstream import Downstream
from ragtune.v1 import gateway_pb2 as g, gateway_pb2_grpc


class ForwardedRpcs(gateway_pb2_grpc.GatewayServiceServicer):
    """The base of GatewayServicer, which provides `_down` and `_authorize(context) -> CallBudget` (each
    method's scope is checked before it runs, from the access table in ragtune/access.py)."""

    _down: Downstream

    # ---- retriever ---------------------------------------------------------------------------
    async def CreateCollection(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceCreateCollectionResponse(
            response=await self._down.retriever.create_collection(request.request, budget))

    async def GetCollection(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceGetCollectionResponse(
            response=await self._down.retriever.get_collection(request.request, budget))

    async def ListCollections(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceListCollectionsResponse(
            response=await self._down.retriever.list_collections(request.request, budget))

    async def DeleteCollection(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceDeleteCollectionResponse(
            response=await self._down.retriever.delete_collection(request.request, budget))

    async def UpsertDocuments(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceUpsertDocumentsResponse(
            response=await self._down.retriever.upsert_documents(request.request, budget))

    async def Ingest(self, request_iterator, context):
        budget = self._authorize(context)
        return g.GatewayServiceIngestResponse(
            response=await self._down.retriever.ingest(_unwrapped(request_iterator), budget))

    async def DeleteDocuments(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceDeleteDocumentsResponse(
            response=await self._down.retriever.delete_documents(request.request, budget))

    async def Search(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceSearchResponse(response=await self._down.retriever.search(request.request, budget))

    async def GetCollectionStats(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceGetCollectionStatsResponse(
            response=await self._down.retriever.get_collection_stats(request.request, budget))

    async def Embed(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceEmbedResponse(response=await self._down.retriever.embed(request.request, budget))

    # ---- trainer -----------------------------------------------------------------------------
    async def GetJob(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceGetJobResponse(response=await self._down.trainer.get_job(request.request, budget))

    async def ListJobs(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceListJobsResponse(response=await self._down.trainer.list_jobs(request.request, budget))

    async def CancelJob(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceCancelJobResponse(response=await self._down.trainer.cancel_job(request.request, budget))

    async def WatchJob(self, request, context):
        budget = self._authorize(context)
        async for item in self._down.trainer.watch_job(request.request, budget):
            yield g.GatewayServiceWatchJobResponse(response=item)

    async def ValidateDataset(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceValidateDatasetResponse(
            response=await self._down.trainer.validate_dataset(request.request, budget))

    async def UploadDataset(self, request_iterator, context):
        budget = self._authorize(context)
        return g.GatewayServiceUploadDatasetResponse(
            response=await self._down.trainer.upload_dataset(_unwrapped(request_iterator), budget))

    async def ListAdapters(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceListAdaptersResponse(
            response=await self._down.trainer.list_adapters(request.request, budget))

    async def GetAdapter(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceGetAdapterResponse(response=await self._down.trainer.get_adapter(request.request, budget))

    async def DeleteAdapter(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceDeleteAdapterResponse(
            response=await self._down.trainer.delete_adapter(request.request, budget))

    async def SetAdapterAlias(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceSetAdapterAliasResponse(
            response=await self._down.trainer.set_adapter_alias(request.request, budget))

    async def GetAdapterAlias(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceGetAdapterAliasResponse(
            response=await self._down.trainer.get_adapter_alias(request.request, budget))

    async def RollbackAdapterAlias(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceRollbackAdapterAliasResponse(
            response=await self._down.trainer.rollback_adapter_alias(request.request, budget))

    # ---- generator ---------------------------------------------------------------------------
    async def LoadAdapter(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceLoadAdapterResponse(
            response=await self._down.generator.load_adapter(request.request, budget))

    async def UnloadAdapter(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceUnloadAdapterResponse(
            response=await self._down.generator.unload_adapter(request.request, budget))

    async def ListLoadedAdapters(self, request, context):
        budget = self._authorize(context)
        return g.GatewayServiceListLoadedAdaptersResponse(
            response=await self._down.generator.list_adapters(request.request, budget))


async def _unwrapped(request_iterator) -> AsyncIterator:
    async for item in request_iterator:
        yield item.request

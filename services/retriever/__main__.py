"""`python -m services.retriever`: runs the retriever until SIGTERM."""

from ragtune.server import run_service
from services.retriever.server import RetrieverService
from services.retriever.settings import RetrieverSettings

if __name__ == "__main__":
    run_service(RetrieverService, RetrieverSettings.from_environment(), name="retriever")

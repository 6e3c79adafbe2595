"""`python -m gateway`: runs the gateway until SIGTERM."""

from ragtune.server import run_service
from gateway.server import GatewayService
from gateway.settings import GatewaySettings

if __name__ == "__main__":
    run_service(GatewayService, GatewaySettings.from_environment(), name="gateway")

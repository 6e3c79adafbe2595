"""ragtune's common package: settings, errors, telemetry, server start-up and the generated stubs.

Services import from here; nothing shared is copied into a service folder.
"""

__version__ = "0.1.0"

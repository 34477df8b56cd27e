"""The ``teltonika-processor`` twistd subcommand (lazy: imports nothing of ours until run)."""

from twisted.application.service import ServiceMaker

teltonikaProcessor = ServiceMaker(  # noqa: N816
    "Teltonika telemetry processor",
    "teltonika.processor.tap",
    "Consume the telemetry stream into PostgreSQL (positions), exactly once.",
    "teltonika-processor",
)

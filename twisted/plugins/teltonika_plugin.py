"""``twistd teltonika``: the Teltonika tracker server.

Only a lazy descriptor: twistd imports ``teltonika.tap`` when the subcommand runs, so a
plugin scan never imports the reactor, Redis or metrics.
"""

from twisted.application.service import ServiceMaker

teltonikaServer = ServiceMaker(  # noqa: N816 (twistd convention)
    "Teltonika tracker server",
    "teltonika.tap",
    "Accept Teltonika trackers over TCP (and UDP) and publish their records to Redis "
    "Streams or a JSON-lines file, ACKing only what is stored.",
    "teltonika",
)

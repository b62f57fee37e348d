"""The ``twistd mta`` plugin: a thin shim, so that importing the plugin
list stays cheap; the work is in `mta.service`."""

from twisted.application.service import ServiceMaker

mta = ServiceMaker(
    "mta",
    "mta.service",
    "A mail transfer agent whose TLS a postmaster can trust and control",
    "mta",
)

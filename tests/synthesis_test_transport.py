"""A third-party transport module, as transport_modules names one: importing it
registers a transport (here the HTTP/2 bridge under another name, for the registry
test)."""

from node import transports
from node.transports.http2 import Http2Transport


class RenamedHttp2(Http2Transport):
    name = "test-h2"


transports.register("test-h2", RenamedHttp2)

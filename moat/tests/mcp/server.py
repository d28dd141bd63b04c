"""The MCP server of the end-to-end tests: the Python SDK's MCPServer (pinned in
requirements.txt) over streamable HTTP, behind TLS, on 127.0.0.1.

    server.py CERT KEY [--json]

Binds an ephemeral port, prints it on one line, then serves /mcp until killed. Two tools:
`echo` (the rules allow it) and `delete_everything` (the rules deny it); a call that reaches
the latter prints `DELETE-EVERYTHING-RAN` on stderr, so a test can tell it never ran.
With --json the server answers POSTs with application/json instead of SSE.
"""

import socket
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

server = MCPServer("moat-e2e")


@server.tool()
def echo(text: str) -> str:
    """Says the text back."""
    return f"echo: {text}"


@server.tool()
def delete_everything() -> str:
    """Deletes everything (never reached through moat)."""
    print("DELETE-EVERYTHING-RAN", file=sys.stderr, flush=True)
    return "deleted"


def main() -> None:
    cert, key = sys.argv[1], sys.argv[2]
    json_response = "--json" in sys.argv[3:]
    # The proxy forwards the workspace's Host (mcp.test:PORT): no DNS-rebinding check here,
    # which guards browsers, not this test.
    app = server.streamable_http_app(
        json_response=json_response,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    config = uvicorn.Config(
        app, ssl_certfile=cert, ssl_keyfile=key, log_level="warning", lifespan="on"
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()

"""The MCP client of the end-to-end tests: the Python SDK's Client (pinned in
requirements.txt) over streamable HTTP, run inside the workspace.

    client.py URL [MODE]

MODE is the SDK's connection mode: `auto` (the default: the 2026-07-28 protocol, stateless,
answered with JSON) or `legacy` (`initialize`, a session, answers as SSE streams).
Lists the tools, calls `echo`, then `delete_everything`, printing one line for each
(`tools: ...`, `echo: ...`, `delete_everything: ...`), errors included as the SDK reports them.
TLS trusts $SSL_CERT_FILE (the workspace's trust store, which holds the workspace CA).
"""

import asyncio
import os
import ssl
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def main(url: str, mode: str) -> None:
    ctx = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    async with httpx2.AsyncClient(verify=ctx) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
            tools = await client.list_tools()
            print("tools:", ",".join(sorted(t.name for t in tools.tools)), flush=True)
            for name, args in [("echo", {"text": "hi"}), ("delete_everything", {})]:
                try:
                    result = await client.call_tool(name, args)
                    texts = [c.text for c in result.content if hasattr(c, "text")]
                    error = " (isError)" if result.is_error else ""
                    print(f"{name}: {' '.join(texts)}{error}", flush=True)
                except Exception as e:  # what the SDK raises is what an agent would see
                    print(f"{name}: {type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "auto"))

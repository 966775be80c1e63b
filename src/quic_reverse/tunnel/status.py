"""The ``--metrics HOST:PORT`` HTTP endpoint of relay and edge.

* ``/metrics``: Prometheus text format (:mod:`.metrics`);
* ``/healthz``: 200 while the process serves;
* ``/ready``: relay: 200 once it listens; edge: 200 while at least one relay session is
  authenticated; otherwise 503;
* ``/``: a status page (one HTML document, no external assets) that refreshes itself
  from ``/status.json`` every second (sessions with their protocol-ping RTT and their
  QUIC path: smoothed RTT, congestion window, packets lost, congestion control).

A deliberately small HTTP/1.1 server on the relay's or edge's own event loop (so it
reads their state without locks): ``GET``/``HEAD`` only, one request per connection,
request head bounded in size and time. Nothing served contains a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from prometheus_client import CONTENT_TYPE_LATEST

from .metrics import TunnelMetrics

__all__ = ["StatusServer"]

log = logging.getLogger("quic_reverse.tunnel.status")

#: Largest request head accepted (bytes) and how long a client may take to send it.
MAX_HEAD = 8192
HEAD_TIMEOUT = 5.0

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS[503] = "Service Unavailable"


class StatusServer:
    """Serve :class:`~quic_reverse.tunnel.metrics.TunnelMetrics` over HTTP."""

    def __init__(self, metrics: TunnelMetrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self.address: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen (raises ``OSError`` naming ``--metrics`` if the port is taken)."""
        try:
            self._server = await asyncio.start_server(self._client, self.host, self.port)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"--metrics: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}",
            ) from None
        sock = self._server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        log.info(
            "metrics and status page on http://%s:%d/ (/metrics, /healthz, /ready)",
            *self.address,
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        self.metrics.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            writer.close()
            return
        try:
            if len(head) > MAX_HEAD:
                status, ctype, body = 400, "text/plain", b"request too large\n"
                method = "GET"
            else:
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                parts = line.split(" ")
                method = parts[0] if parts else ""
                path = parts[1].split("?", 1)[0] if len(parts) == 3 else ""
                if method not in ("GET", "HEAD"):
                    status, ctype, body = 405, "text/plain", b"GET or HEAD only\n"
                else:
                    status, ctype, body = self._route(path)
            head_out = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
            ).encode("latin-1")
            writer.write(head_out if method == "HEAD" else head_out + body)
            with contextlib.suppress(OSError):
                await writer.drain()
        finally:
            writer.close()

    def _route(self, path: str) -> tuple[int, str, bytes]:
        m = self.metrics
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, m.exposition()
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/ready":
            if m.is_ready():
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", b"not ready\n"
        if path == "/status.json":
            return 200, "application/json", json.dumps(m.status()).encode()
        if path in ("/", "/status"):
            return 200, "text/html; charset=utf-8", STATUS_PAGE.encode()
        return 404, "text/plain", b"not found\n"


#: The status page: static HTML; the script fills the tables from /status.json.
STATUS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>quic-reverse status</title>
<noscript><meta http-equiv="refresh" content="5"></noscript>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3} td.n{text-align:right} .bad{color:#b00}
</style></head>
<body>
<h1 id="title">quic-reverse</h1>
<p id="summary">loading&hellip;</p>
<div id="tables"></div>
<script>
"use strict";
const REFRESH_MS = 1000;
function esc(v){return String(v).replace(/[&<>"']/g,c=>"&#"+c.charCodeAt(0)+";")}
function bytes(n){const u=["B","KiB","MiB","GiB","TiB"];let i=0;
  while(n>=1024&&i<u.length-1){n/=1024;i++}return (i?n.toFixed(1):n)+" "+u[i]}
function ago(t,now){if(t==null)return "";const s=Math.max(0,Math.round(now-t));
  return new Date(t*1000).toISOString().replace(".000","")+" ("+s+" s)"}
function ms(r){return r==null?"":(r*1000).toFixed(2)+" ms"}
function loss(p){return p==null||p.loss_ratio==null?"":
  (p.loss_ratio*100).toFixed(2)+" % ("+p.lost+" of "+p.sent+")"}
function path(p){p=p||{};return [ms(p.rtt),p.cwnd==null?"":bytes(p.cwnd),loss(p),
  p.congestion_control||""]}
const PATH_HEAD=["QUIC RTT","congestion window","packets lost","congestion control"];
function table(id,cls,head,rows){
  let h='<table id="'+id+'"><tr>'+head.map(x=>"<th>"+esc(x)+"</th>").join("")+"</tr>";
  for(const r of rows){h+='<tr class="'+cls+'">'+r.map(c=>
    typeof c==="number"?'<td class="n">'+c+"</td>":"<td>"+esc(c)+"</td>").join("")+"</tr>"}
  if(!rows.length)h+='<tr><td colspan="'+head.length+'">none</td></tr>';
  return h+"</table>"}
function render(s){
  document.getElementById("title").textContent="quic-reverse "+s.role+
    (s.name?" "+s.name:"")+" "+s.version;
  const sum=document.getElementById("summary");
  sum.textContent=(s.ready?"ready":"NOT READY")+"; up since "+ago(s.started,s.now)+
    "; failed authentications: "+s.auth_failures+
    (s.reconnects!=null?"; reconnects: "+s.reconnects:"");
  sum.className=s.ready?"":"bad";
  let h="";
  if(s.role==="relay"){
    h+="<h2>Edges ("+s.edges.length+")</h2>"+table("edges","edge",
      ["edge","instance","address","connected since","RTT",...PATH_HEAD,"active streams",
       "bytes up","bytes down"],
      s.edges.map(e=>[e.name,e.instance||"",e.address,ago(e.since,s.now),ms(e.rtt),
        ...path(e.path),e.active,bytes(e.up),bytes(e.down)]));
    h+="<h2>Forwards</h2>"+table("forwards","forward",
      ["forward","active","total","bytes up","bytes down","outcomes"],
      s.forwards.map(f=>[f.forward,f.active,f.total,bytes(f.up),bytes(f.down),
        Object.entries(f.outcomes).map(([k,v])=>k+": "+v).join(", ")]));
  }else{
    h+="<h2>Relay sessions ("+s.relays.length+")</h2>"+table("relays","relay",
      ["relay","connected since","RTT",...PATH_HEAD,"active streams"],
      s.relays.map(r=>[r.address,ago(r.since,s.now),ms(r.rtt),...path(r.path),r.active]));
    h+="<h2>Services</h2>"+table("services","service",
      ["service","target","active","total","bytes up","bytes down","outcomes"],
      s.services.map(v=>[v.service,v.target,v.active,v.total,bytes(v.up),bytes(v.down),
        Object.entries(v.outcomes).map(([k,n])=>k+": "+n).join(", ")]));
  }
  document.getElementById("tables").innerHTML=h;
  document.body.dataset.updated=String(s.now);
}
async function refresh(){
  try{const r=await fetch("status.json",{cache:"no-store"});render(await r.json())}
  catch(e){const sum=document.getElementById("summary");
    sum.textContent="status unavailable: "+e;sum.className="bad"}
  setTimeout(refresh,REFRESH_MS)}
refresh();
</script>
</body></html>
"""

// A downstream that is never the bottleneck: it answers every call after LATENCY_MS,
// records when each call arrived and the ID in its path, and hands the record over at
// GET /_record (then forgets it). GET /_count says how many calls it holds and when the
// last one came, forgetting nothing, so that a caller can wait for them cheaply. Node's
// one thread waits on timers, not on CPU, so a thousand calls a second cost it little.
"use strict";
const http = require("http");
const { performance } = require("perf_hooks");

const port = Number(process.env.PORT || 0);
const latency = Number(process.env.LATENCY_MS || 200);
let arrivals = [];
let inFlight = 0;
let mostInFlight = 0;
let connections = 0;

function now() {
  return (performance.timeOrigin + performance.now()) / 1000;
}

const server = http.createServer((request, response) => {
  if (request.url === "/_record") {
    const body = JSON.stringify({ arrivals, most_in_flight: mostInFlight, connections });
    arrivals = [];
    mostInFlight = 0;
    connections = 0;
    response.writeHead(200, { "content-type": "application/json" });
    response.end(body);
    return;
  }
  if (request.url === "/_count") {
    const last = arrivals.length ? arrivals[arrivals.length - 1][0] : null;
    response.writeHead(200, { "content-type": "application/json" });
    response.end(JSON.stringify({ arrivals: arrivals.length, last }));
    return;
  }
  const id = Number(request.url.split("/").pop().split("?")[0]);
  arrivals.push([now(), id]);
  inFlight += 1;
  mostInFlight = Math.max(mostInFlight, inFlight);
  request.resume();
  setTimeout(() => {
    inFlight -= 1;
    response.writeHead(200, { "content-type": "text/plain", "content-length": "2" });
    response.end("ok");
  }, latency);
});
server.keepAliveTimeout = 60000;
server.on("connection", () => {
  connections += 1;
});
server.listen(port, "127.0.0.1", () => {
  process.stdout.write(`${server.address().port}\n`);
});

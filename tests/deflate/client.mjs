// Node's `ws` (perMessageDeflate on, its client's default) against a
// running sluice: the extension is agreed, and messages of 0 B, 100 B and
// 1 MiB, text and binary, round-trip on /echo and through a publish on
// /ws. Prints "ok" last when all is well.
//
// Against `--deflate dedicated` (second argument), context takeover is
// agreed both ways.
//
// usage: node client.mjs ws://HOST:PORT [dedicated]   (NODE_PATH: tests/stomp/node_modules)

import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.NODE_PATH || ".", "x.js"));
const WebSocket = require("ws");

const AGREED =
  process.argv[3] === "dedicated"
    ? "permessage-deflate"
    : "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
const SIZES = [0, 100, 1 << 20];
const text = (n) => '{"k":"v","n":[1,2,3]}'.repeat(Math.floor(n / 20) + 1).slice(0, n);

function open(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { perMessageDeflate: { threshold: 0 }, maxPayload: 1 << 24 });
    const queue = [];
    const waiting = [];
    ws.on("message", (data, binary) => {
      const m = binary ? Buffer.from(data) : data.toString();
      if (waiting.length) waiting.shift()(m);
      else queue.push(m);
    });
    ws.recv = () => (queue.length ? Promise.resolve(queue.shift()) : new Promise((r) => waiting.push(r)));
    ws.on("upgrade", (res) => (ws.agreed = res.headers["sec-websocket-extensions"]));
    ws.on("open", () => resolve(ws));
    ws.on("error", reject);
  });
}

function assert(ok, what) {
  if (!ok) {
    console.log("failed:", what);
    process.exit(1);
  }
}

const base = process.argv[2];
const timer = setTimeout(() => {
  console.log("timed out");
  process.exit(1);
}, 30000);
const echo = await open(base + "/echo");
assert(echo.agreed === AGREED, echo.agreed);
assert(String(echo.extensions).startsWith("permessage-deflate"), "extension in use: " + echo.extensions);
for (const n of [...SIZES, ...SIZES]) {
  echo.send(text(n));
  assert((await echo.recv()) === text(n), `text ${n}`);
  const data = Buffer.alloc(n, 0).map((_, i) => i % 256);
  echo.send(data);
  assert(Buffer.compare(await echo.recv(), data) === 0, `binary ${n}`);
  console.log("echo", n, "ok");
}
echo.close();
const sub = await open(base + "/ws");
const pub = await open(base + "/ws");
assert((await sub.recv()).startsWith("HELLO "), "hello");
assert((await pub.recv()).startsWith("HELLO "), "hello");
sub.send("SUB news");
await new Promise((r) => setTimeout(r, 200));
for (const n of SIZES) {
  pub.send("PUB news " + text(n));
  assert((await sub.recv()) === "MSG news " + text(n), `publish ${n}`);
  console.log("publish", n, "ok");
}
sub.close();
pub.close();
clearTimeout(timer);
console.log("ok");

#!/usr/bin/env node
// A native-protocol client of sluice (docs/PROTOCOL.md): subscribes to the
// topics given, prints every message as `MSG <topic> <payload>`, and keeps
// at it: when the connection drops it reconnects with a capped, jittered
// backoff and subscribes to everything again. With a token file, it sends
// the token at the handshake and, before the token expires, re-reads the
// file and hands the server the fresh one with `AUTH`.
//
// Status lines go to stdout beside the messages: `connected <session>`,
// `subscribed <topic>`, `closed <code> <reason>`, `reconnecting in <n> ms`,
// `refreshed token`. A token is never printed, nor a control character of
// what the server sent (it is shown as `\xNN`, so that a message cannot
// drive the terminal).
//
// usage: node client.mjs [--url URL] [--token-file PATH] [--refresh-margin SECS]
//                        [--backoff-ms MS] [--max-backoff-ms MS] [--stable-ms MS] TOPIC...

import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import WebSocket from "ws";

const usage =
  "usage: node client.mjs [--url URL] [--token-file PATH] [--refresh-margin SECS]\n" +
  "                       [--backoff-ms MS] [--max-backoff-ms MS] [--stable-ms MS] TOPIC...";
let parsed;
try {
  parsed = parseArgs({
    allowPositionals: true,
    options: {
      url: { type: "string", default: "ws://127.0.0.1:8080/ws" },
      "token-file": { type: "string" },
      "refresh-margin": { type: "string", default: "30" },
      "backoff-ms": { type: "string", default: "500" },
      "max-backoff-ms": { type: "string", default: "30000" },
      "stable-ms": { type: "string", default: "10000" },
    },
  });
} catch (e) {
  console.error(`${e.message}\n${usage}`);
  process.exit(2);
}
const { values: opts, positionals: topics } = parsed;
if (topics.length === 0) {
  console.error(usage);
  process.exit(2);
}
// A finite number not below `low`, or the usage error: a delay of NaN or
// below zero would reconnect in a tight loop.
function atLeast(name, low) {
  const text = opts[name];
  const value = text.trim() === "" ? NaN : Number(text);
  if (!Number.isFinite(value) || value < low) {
    console.error(`--${name} must be a number of at least ${low}: ${JSON.stringify(text)}`);
    process.exit(2);
  }
  return value;
}
const marginSecs = atLeast("refresh-margin", 0);
const backoffMs = atLeast("backoff-ms", 1);
const maxBackoffMs = atLeast("max-backoff-ms", 1);
const stableMs = atLeast("stable-ms", 0);

// `text` with its control characters (C0, DEL, C1) but tab spelled out:
// another publisher's message must not reach the terminal as an escape
// sequence.
const shown = (text) =>
  text.replace(/[\x00-\x08\x0a-\x1f\x7f-\x9f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`);
const status = (line) => console.log(shown(line));

// A JWT: three base64url parts with dots between (the signature may be empty).
const JWT = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/;

// Errors about a token file; their messages never quote the token.
class TokenError extends Error {}

// The raw content of the token file, or a description of why it cannot be
// read (then no token).
function readTokenFile() {
  const path = opts["token-file"];
  try {
    return { content: readFileSync(path, "utf8") };
  } catch (e) {
    return { content: `error ${e.code}`, error: new TokenError(`cannot read ${path}: ${e.code ?? e.message}`) };
  }
}

// The file's first non-empty line, trimmed, if it is a JWT (what follows,
// a comment of whatever rotates the file, is not sent), and its `exp`.
function parseToken({ content, error }) {
  if (error) throw error;
  const path = opts["token-file"];
  const token = content.split(/\r?\n/).map((line) => line.trim()).find((line) => line) ?? "";
  if (!token) throw new TokenError(`${path} holds no token`);
  if (!JWT.test(token)) throw new TokenError(`the token in ${path} is not a JWT (base64url parts and dots)`);
  return { token, exp: expiry(token) };
}

// The token's `exp` (seconds since the epoch), read without checking the
// signature: that is the server's business, the client only needs to know
// when to bring a fresh one. A token without a finite number there is
// refused: the client could not tell when to refresh it.
function expiry(token) {
  let claims;
  try {
    claims = JSON.parse(Buffer.from(token.split(".")[1], "base64url").toString("utf8"));
  } catch {
    throw new TokenError("the token's payload is not base64url JSON"); // the parser's message quotes it
  }
  const exp = claims !== null && typeof claims === "object" ? claims.exp : undefined;
  if (typeof exp !== "number" || !Number.isFinite(exp)) throw new TokenError("the token has no numeric exp");
  return exp;
}

const describe = (e) => (e instanceof TokenError ? `token refused: ${e.message}` : e.message);

// How often a connection pings the server; a ping unanswered by the next
// one drops it (as Python's websockets does, every 20 s).
const PING_MS = 20_000;

// setTimeout fires at once past 2^31-1 ms; a longer wait is taken in steps.
const MAX_TIMEOUT_MS = 2 ** 31 - 1;

let attempt = 0;

function connect() {
  let token = null;
  let current = 0;
  let ws;
  try {
    if (opts["token-file"]) ({ token, exp: current } = parseToken(readTokenFile()));
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    ws = new WebSocket(opts.url, ["sluice"], { headers, handshakeTimeout: 10_000 });
  } catch (e) {
    status(`connection failed: ${describe(e)}`);
    retry(null);
    return;
  }
  let refreshTimer = null;
  let connectedAt = null; // when HELLO came
  // A server that upgrades and then says nothing, or stops answering
  // later, is dropped: HELLO must come within the handshake's 10 s, and a
  // ping every PING_MS must be answered before the next.
  let helloTimer = setTimeout(() => {
    status("connection failed: no HELLO in 10 s");
    ws.terminate();
  }, 10_000);
  let pingTimer = null;
  let answered = true;
  ws.on("open", () => {
    pingTimer = setInterval(() => {
      if (!answered) {
        status("connection failed: no pong");
        ws.terminate();
        return;
      }
      answered = false;
      ws.ping();
    }, PING_MS);
  });
  ws.on("pong", () => {
    answered = true;
  });

  // AUTH with a fresh token `marginSecs` before the current one expires
  // (halfway there if it lives shorter than twice that). Until the file
  // holds a fresher token it looks again, 1 s later, then 2, 4... up to
  // 30 (no later than the current token's exp while that is further
  // off), and says what is wrong once for each content of the file.
  let retryMs = 1000;
  let said = null; // what the file held when the client last complained

  function armAt(dueAt) {
    refreshTimer = setTimeout(() => {
      if (Date.now() < dueAt) armAt(dueAt);
      else refresh();
    }, Math.min(Math.max(dueAt - Date.now(), 0), MAX_TIMEOUT_MS));
  }

  function scheduleRefresh() {
    const leftMs = current * 1000 - Date.now();
    armAt(Date.now() + Math.max(leftMs - marginSecs * 1000, leftMs / 2, 0));
  }

  function refresh() {
    if (ws.readyState !== WebSocket.OPEN) return;
    const file = readTokenFile();
    let problem;
    let fresh;
    try {
      fresh = parseToken(file);
      if (fresh.exp <= current) problem = "token file holds no fresher token";
    } catch (e) {
      problem = describe(e);
    }
    if (!problem) {
      ws.send(`AUTH ${fresh.token}`);
      current = fresh.exp;
      status("refreshed token");
      retryMs = 1000;
      said = null;
      scheduleRefresh();
      return;
    }
    if (file.content !== said) {
      status(problem);
      said = file.content;
    }
    const leftMs = current * 1000 - Date.now();
    armAt(Date.now() + (leftMs > 1000 ? Math.min(retryMs, leftMs) : retryMs));
    retryMs = Math.min(retryMs * 2, 30_000);
  }

  ws.on("message", (data, isBinary) => {
    if (connectedAt === null) {
      const text = isBinary ? null : data.toString("utf8");
      if (text === null || !text.startsWith("HELLO ")) {
        const kind = isBinary ? "a binary" : "a text";
        status(`connection failed: expected HELLO, got ${kind} message of ${data.length} bytes`);
        ws.terminate();
        return;
      }
      connectedAt = Date.now();
      clearTimeout(helloTimer);
      status(`connected ${text.slice("HELLO ".length)}`);
      // A new connection has no subscriptions: make them all again.
      for (const topic of new Set(topics)) {
        ws.send(`SUB ${topic}`);
        status(`subscribed ${topic}`);
      }
      if (token) scheduleRefresh();
      return;
    }
    console.log(shown(data.toString("utf8"))); // MSG <topic> <payload>, or ERR ...
  });
  ws.on("error", (e) => status(`connection failed: ${e.message}`));
  ws.on("close", (code, reason) => {
    clearTimeout(refreshTimer);
    clearTimeout(helloTimer);
    clearInterval(pingTimer);
    if (connectedAt !== null) status(`closed ${code} ${reason.toString()}`);
    retry(connectedAt);
  });
}

// Exponential backoff, capped, with jitter so that many clients dropped at
// once do not return at once. Only a connection that stayed up a while
// (since `connectedAt`) starts it over: a server that takes the connection
// and drops it at once sees the delays grow.
function retry(connectedAt) {
  if (connectedAt !== null && Date.now() - connectedAt >= stableMs) attempt = 0;
  const capped = Math.min(maxBackoffMs, backoffMs * 2 ** attempt);
  const delayMs = Math.round(capped / 2 + Math.random() * (capped / 2));
  attempt = Math.min(attempt + 1, 30);
  status(`reconnecting in ${delayMs} ms`);
  setTimeout(connect, delayMs);
}

connect();

// STOMP scenarios run by @stomp/stompjs (over the `ws` package) against a
// running sluice. Usage: node scenarios.mjs ws://HOST:PORT
// Prints "ok <scenario>" for each; exits non-zero at the first failure.
// Every wait is bounded, so a broken server fails the run instead of hanging.
import { Client } from '@stomp/stompjs';
import WebSocket from 'ws';

const base = process.argv[2];
const SUBPROTOCOLS = ['v12.stomp', 'v11.stomp', 'v10.stomp'];

function fail(message) {
  console.error(`FAIL ${message}`);
  process.exit(1);
}

function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Time for a subscription to reach the server's other cores (a RECEIPT
// confirms it on the subscriber's own core).
const SETTLE = 300;

/// A connected stompjs client; `debugLines` keeps its debug output.
async function connect(options = {}) {
  const debugLines = [];
  const client = new Client({
    webSocketFactory: () => new WebSocket(`${base}/stomp`, SUBPROTOCOLS),
    reconnectDelay: 0,
    heartbeatIncoming: 0,
    heartbeatOutgoing: 0,
    debug: (line) => debugLines.push(line),
    ...options,
  });
  const errors = [];
  client.onStompError = (frame) => errors.push(frame);
  const connected = new Promise((resolve, reject) => {
    client.onConnect = resolve;
    client.onWebSocketError = (e) => reject(new Error(`websocket error ${e.message ?? e}`));
  });
  client.activate();
  const frame = await within(5000, 'CONNECTED', connected);
  return { client, frame, errors, debugLines };
}

let receipts = 0;

/// Subscribes and collects messages; `ready` resolves once the server
/// confirmed the SUBSCRIBE (RECEIPT); `next()` waits for the next message.
function collect(client, destination, headers = {}) {
  const messages = [];
  let waiting = null;
  const rid = `sub-${++receipts}`;
  const ready = receipt(client, rid);
  const subscription = client.subscribe(destination, (m) => {
    messages.push(m);
    if (waiting) {
      const w = waiting;
      waiting = null;
      w();
    }
  }, { ...headers, receipt: rid });
  return {
    ready,
    subscription,
    messages,
    async next(ms = 5000) {
      const start = messages.length;
      while (messages.length === start) {
        await within(ms, `a message on ${destination}`, new Promise((r) => { waiting = r; }));
      }
      return messages[start];
    },
    async count(n, ms = 5000) {
      const deadline = Date.now() + ms;
      while (messages.length < n) {
        if (Date.now() > deadline) fail(`${destination}: ${messages.length} of ${n} messages`);
        await sleep(10);
      }
    },
  };
}

/// A receipt for `frame` (publish/subscribe headers), awaited.
function receipt(client, id) {
  return within(5000, `RECEIPT ${id}`, new Promise((r) => client.watchForReceipt(id, r)));
}

function expect(cond, what) {
  if (!cond) fail(what);
}

/// A raw native-protocol client on /ws.
async function native() {
  const ws = new WebSocket(`${base}/ws`);
  const inbox = [];
  let waiting = null;
  ws.on('message', (data, isBinary) => {
    inbox.push(isBinary ? data : data.toString());
    if (waiting) {
      const w = waiting;
      waiting = null;
      w();
    }
  });
  await within(5000, 'native open', new Promise((r, j) => { ws.on('open', r); ws.on('error', j); }));
  const next = async () => {
    while (inbox.length === 0) {
      await within(5000, 'a native message', new Promise((r) => { waiting = r; }));
    }
    return inbox.shift();
  };
  const hello = await next();
  expect(String(hello).startsWith('HELLO '), `native hello ${hello}`);
  return { ws, next };
}

const scenarios = {
  async 'connect, subscribe, send, receive'() {
    const a = await connect();
    expect(a.frame.headers.version === '1.2', `version ${a.frame.headers.version}`);
    expect(a.frame.headers.server.startsWith('sluice/'), 'server header');
    expect(a.frame.headers.session.split('.').length === 3, 'session header');
    const b = await connect();
    const sub = collect(a.client, '/topic/chat');
    // A receipt for the SUBSCRIBE: it is in place on its core once the
    // receipt is back; other cores learn of it through the mesh.
    await sub.ready;
    await sleep(SETTLE);
    b.client.publish({
      destination: '/topic/chat',
      body: 'hello, stomp',
      // Escaped both ways (a colon, a backslash). Not `\\c`: stompjs
      // 7.5 unescapes `\\\\c` (an escaped backslash, then c) as `\\:`.
      headers: { 'content-type': 'text/plain', 'x-trace': 'a:b\\', receipt: 'send-1' },
    });
    const m = await sub.next();
    expect(m.body === 'hello, stomp', `body ${m.body}`);
    expect(m.headers.destination === '/topic/chat', `destination ${m.headers.destination}`);
    expect(m.headers.subscription === sub.subscription.id, 'subscription header');
    expect(m.headers['message-id'], 'message-id');
    expect(m.headers['x-trace'] === 'a:b\\', `user header ${m.headers['x-trace']}`);
    expect(m.headers['content-type'] === 'text/plain', 'content-type');
    // Binary bodies, NULs included, come through whole.
    const bytes = new Uint8Array([0, 1, 2, 0, 255]);
    b.client.publish({ destination: '/topic/chat', binaryBody: bytes, headers: { 'content-type': 'application/octet-stream' } });
    const bin = await sub.next();
    expect(Buffer.compare(Buffer.from(bin.binaryBody), Buffer.from(bytes)) === 0, 'binary body');
    sub.subscription.unsubscribe({ receipt: 'unsub-1' });
    await receipt(a.client, 'unsub-1');
    b.client.publish({ destination: '/topic/chat', body: 'after unsubscribe' });
    await sleep(200);
    expect(sub.messages.length === 2, 'no message after UNSUBSCRIBE');
    await a.client.deactivate();
    await b.client.deactivate();
  },

  async 'receipts'() {
    const a = await connect();
    const got = receipt(a.client, 'r-send');
    a.client.publish({ destination: '/topic/r', body: 'x', headers: { receipt: 'r-send' } });
    const r = await got;
    expect(r.headers['receipt-id'] === 'r-send', 'receipt-id');
    // DISCONNECT with a receipt: stompjs waits for it before closing.
    let closed = new Promise((resolve) => { a.client.onWebSocketClose = resolve; });
    await within(5000, 'disconnect', a.client.deactivate());
    const event = await within(5000, 'close', closed);
    expect(event.code === 1000, `close code after DISCONNECT ${event.code}`);
    expect(a.debugLines.some((l) => l.includes('RECEIPT')), 'DISCONNECT receipt');
  },

  async 'transactions'() {
    const a = await connect();
    const b = await connect();
    const sub = collect(a.client, '/topic/tx');
    await sub.ready;
    await sleep(SETTLE);
    const tx = b.client.begin('tx-1');
    b.client.publish({ destination: '/topic/tx', body: 'one', headers: { transaction: tx.id } });
    b.client.publish({ destination: '/topic/tx', body: 'two', headers: { transaction: tx.id } });
    await sleep(300);
    expect(sub.messages.length === 0, 'SENDs wait for COMMIT');
    tx.commit();
    await sub.count(2);
    expect(sub.messages.map((m) => m.body).join() === 'one,two', 'in order on COMMIT');
    const dropped = b.client.begin('tx-2');
    b.client.publish({ destination: '/topic/tx', body: 'never', headers: { transaction: dropped.id } });
    dropped.abort();
    b.client.publish({ destination: '/topic/tx', body: 'three', headers: { receipt: 'after-abort' } });
    await receipt(b.client, 'after-abort');
    await sub.count(3);
    await sleep(100);
    expect(sub.messages.map((m) => m.body).join() === 'one,two,three', 'ABORT drops its SENDs');
    await a.client.deactivate();
    await b.client.deactivate();
  },

  // The server runs with --stomp-heart-beat-ms 200.
  async 'heart-beats'() {
    const a = await connect({ heartbeatIncoming: 200, heartbeatOutgoing: 200 });
    expect(a.frame.headers['heart-beat'] === '200,200', `heart-beat ${a.frame.headers['heart-beat']}`);
    let closed = false;
    a.client.onWebSocketClose = () => { closed = true; };
    await sleep(1500);
    const pongs = a.debugLines.filter((l) => l === '<<< PONG').length;
    expect(pongs >= 4, `${pongs} server heart-beats in 1.5 s at 200 ms`);
    expect(!a.debugLines.some((l) => l.includes('did not receive server activity')), 'server stayed alive');
    expect(!closed, 'a client that heart-beats stays connected');
    await a.client.deactivate();
  },

  async 'STOMP and native clients see each other'() {
    const s = await connect();
    const n = await native();
    const sub = collect(s.client, '/topic/mixed');
    await sub.ready;
    n.ws.send('SUB mixed');
    await sleep(200);
    n.ws.send('PUB mixed from native');
    const m = await sub.next();
    expect(m.body === 'from native', `STOMP got ${m.body}`);
    expect(m.headers['content-type'] === 'text/plain;charset=utf-8', `content-type ${m.headers['content-type']}`);
    expect(m.headers['content-length'] === '11', 'content-length');
    // The native publisher is subscribed too: skip its own message.
    const own = await n.next();
    expect(own === 'MSG mixed from native', `native echo ${own}`);
    s.client.publish({ destination: '/topic/mixed', body: 'from stomp' });
    const got = await n.next();
    expect(got === 'MSG mixed from stomp', `native got ${got}`);
    n.ws.close();
    await s.client.deactivate();
  },

  async 'queues give each message to one subscriber'() {
    const a = await connect();
    const b = await connect();
    const p = await connect();
    const qa = collect(a.client, '/queue/jobs', { ack: 'client-individual' });
    const qb = collect(b.client, '/queue/jobs');
    await qa.ready;
    await qb.ready;
    // Subscriptions on another core take a moment to be known here.
    await sleep(300);
    for (let i = 0; i < 10; i++) p.client.publish({ destination: '/queue/jobs', body: `job ${i}` });
    await within(5000, 'queue messages', (async () => {
      while (qa.messages.length + qb.messages.length < 10) await sleep(10);
    })());
    await sleep(200);
    expect(qa.messages.length === 5 && qb.messages.length === 5, `split ${qa.messages.length}/${qb.messages.length}`);
    const bodies = [...qa.messages, ...qb.messages].map((m) => m.body).sort();
    expect(new Set(bodies).size === 10, 'each job once');
    // client-individual: MESSAGE has an ack header, and ACK is accepted.
    expect(qa.messages[0].headers.ack, 'ack header');
    qa.messages[0].ack({ receipt: 'ack-1' });
    await receipt(a.client, 'ack-1');
    for (const c of [a, b, p]) await c.client.deactivate();
  },

  async 'ERROR on a bad frame, then close'() {
    const a = await connect();
    let closedWith = new Promise((resolve) => { a.client.onWebSocketClose = resolve; });
    a.client.publish({ destination: '/nowhere/x', body: 'x' });
    const event = await within(5000, 'close after ERROR', closedWith);
    expect(a.errors.length === 1, `${a.errors.length} ERROR frames`);
    const e = a.errors[0];
    expect(e.headers.message === 'unsupported destination', `message ${e.headers.message}`);
    expect(e.body.includes('/topic/') && e.body.includes('/queue/'), 'names the prefixes');
    expect(event.code === 1002, `close code ${event.code}`);
    await a.client.deactivate();

    // A frame the codec refuses, sent raw.
    const ws = new WebSocket(`${base}/stomp`, SUBPROTOCOLS);
    const inbox = [];
    ws.on('message', (d) => inbox.push(d.toString()));
    await within(5000, 'raw open', new Promise((r) => ws.on('open', r)));
    expect(ws.protocol === 'v12.stomp', `subprotocol ${ws.protocol}`);
    const closed = new Promise((r) => ws.on('close', (code) => r(code)));
    ws.send('CONNECT\naccept-version:1.2\n\n\0BOGUS\n\n\0');
    const code = await within(5000, 'raw close', closed);
    expect(inbox[0].startsWith('CONNECTED\n'), `first ${inbox[0]}`);
    expect(inbox[1].startsWith('ERROR\n') && inbox[1].includes('message:'), `then ${inbox[1]}`);
    expect(code === 1002, `raw close code ${code}`);
  },
};

for (const [name, run] of Object.entries(scenarios)) {
  try {
    await within(20000, name, run());
  } catch (e) {
    fail(`${name}: ${e.stack ?? e}`);
  }
  console.log(`ok ${name}`);
}
process.exit(0);

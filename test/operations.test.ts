// Operations against the contract (/work/shared/api.md, "Wire and transports" and "Errors"): probes,
// metrics, plain-HTTP Connect, undecodable bodies, unknown paths, request ids, gRPC health, shutdown.
import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { CreateChatRequestSchema, CreateChatResponseSchema, ListChatsRequestSchema } from "../gen/parley/v1/chat_pb.js";
import { NotificationSchema, SubscribeRequestSchema, type Notification } from "../gen/parley/v1/notification_pb.js";
import { parleyClient } from "./support/clients.js";
import { until } from "./support/streams.js";
import { startTestServer, tokenFor, uniqueTenant, type TestServer } from "./support/server.js";

const protoDir = path.join(path.dirname(fileURLToPath(import.meta.url)), "../proto");

let server: TestServer;
let token: string;

test.before(async () => {
  server = await startTestServer();
  token = await tokenFor(uniqueTenant("ops"), "alice");
});

test.after(async () => {
  await server?.destroy();
});

// ---------------------------------------------------------------------------------------------
// Helpers

interface RawResponse {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
}

/** One request over a fresh HTTP/1.1 connection (no client library in between). */
function http1(url: string, method: string, reqPath: string, headers: Record<string, string>, body?: Buffer | string): Promise<RawResponse> {
  return new Promise((resolve, reject) => {
    const req = http.request(`${url}${reqPath}`, { method, headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => resolve({ status: res.statusCode!, headers: res.headers, body: Buffer.concat(chunks) }));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(body);
  });
}

interface H2Response {
  headers: http2.IncomingHttpHeaders;
  trailers: http2.IncomingHttpHeaders;
  body: Buffer;
  rstCode?: number;
}

/** One HTTP/2 request on its own session; `sent` resolves when the request has been written out. */
function http2Request(url: string, headers: http2.OutgoingHttpHeaders, body: Buffer, sent?: (value: void) => void): Promise<H2Response> {
  return new Promise((resolve, reject) => {
    const session = http2.connect(url);
    session.on("error", reject);
    const stream = session.request(headers);
    const chunks: Buffer[] = [];
    let responseHeaders: http2.IncomingHttpHeaders = {};
    let trailers: http2.IncomingHttpHeaders = {};
    stream.on("response", (h) => (responseHeaders = h));
    stream.on("trailers", (t) => (trailers = t));
    stream.on("data", (c) => chunks.push(c));
    stream.on("error", () => {});
    stream.on("close", () => {
      session.close();
      resolve({ headers: responseHeaders, trailers, body: Buffer.concat(chunks), rstCode: stream.rstCode });
    });
    stream.end(body, () => sent?.());
  });
}

function envelope(message: Uint8Array | Buffer, flags = 0): Buffer {
  const header = Buffer.alloc(5);
  header.writeUInt8(flags, 0);
  header.writeUInt32BE(message.length, 1);
  return Buffer.concat([header, Buffer.from(message)]);
}

/** grpc-status of a gRPC response: from the trailers, or from the headers of a trailers-only response. */
const grpcStatus = (r: H2Response) => String(r.trailers["grpc-status"] ?? r.headers["grpc-status"] ?? "none");

function grpcHeaders(method: string, auth = true): http2.OutgoingHttpHeaders {
  return {
    ":method": "POST",
    ":path": `/${method}`,
    "content-type": "application/grpc",
    te: "trailers",
    ...(auth ? { authorization: `Bearer ${token}` } : {}),
  };
}

/** The sum of a Prometheus sample over every series with these labels (other labels may vary). */
function metricValue(text: string, name: string, labels: Record<string, string>): number {
  let sum = 0;
  for (const line of text.split("\n")) {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m || m[1] !== name) continue;
    const have: Record<string, string> = {};
    for (const l of (m[2] ?? "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) have[l[1]!] = l[2]!;
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) sum += Number(m[3]);
  }
  return sum;
}

async function metrics(): Promise<string> {
  const response = await fetch(`${server.url}/metrics`);
  assert.is(response.status, 200);
  return response.text();
}

function connectJson(rpc: string, body: string, headers: Record<string, string> = {}) {
  return fetch(`${server.url}/${rpc}`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${token}`, ...headers },
    body,
  });
}

const noStackTrace = (text: string) => !/\n\s+at \S/.test(text) && !/\.ts:\d+/.test(text) && !/SELECT|INSERT|UPDATE /.test(text);

// ---------------------------------------------------------------------------------------------
// Probes

test("operations - GET /healthz answers 200", async () => {
  const response = await fetch(`${server.url}/healthz`);
  assert.is(response.status, 200);
  await response.body?.cancel();
});

test("operations - GET /readyz answers 200 when the database and bus are reachable", async () => {
  const response = await fetch(`${server.url}/readyz`);
  assert.is(response.status, 200);
  await response.body?.cancel();
});

test("operations - probes need no token and are plain HTTP/1.1 GETs", async () => {
  for (const p of ["/healthz", "/readyz", "/metrics"]) {
    const r = await http1(server.url, "GET", p, {});
    assert.is(r.status, 200, p);
  }
});

test("operations - HEAD /healthz and /readyz answer 200, over HTTP/1.1 and HTTP/2", async () => {
  for (const p of ["/healthz", "/readyz"]) {
    assert.is((await http1(server.url, "HEAD", p, {})).status, 200, p);
    assert.is((await http2Request(server.url, { ":method": "HEAD", ":path": p }, Buffer.alloc(0))).headers[":status"], 200, p);
  }
});

// ---------------------------------------------------------------------------------------------
// Metrics

test("operations - /metrics is Prometheus text with RPC counters by method and code", async () => {
  const before = await metrics();
  const alice = parleyClient(server.url, token);
  const aliceGrpc = parleyClient(server.url, token, "grpc");
  for (let i = 0; i < 3; i++) await alice.chats.createChat({ name: `m${i}` });
  await aliceGrpc.chats.createChat({ name: "m-grpc" });
  for (let i = 0; i < 2; i++) {
    const r = await fetch(`${server.url}/parley.v1.ChatService/ListChats`, { method: "POST", headers: { "content-type": "application/json" }, body: "{}" });
    assert.is(r.status, 401);
    await r.body?.cancel();
  }

  const response = await fetch(`${server.url}/metrics`);
  assert.is(response.status, 200);
  const type = response.headers.get("content-type") ?? "";
  assert.ok(/^text\/plain/.test(type) || /^application\/openmetrics-text/.test(type), `content-type ${type}`);
  const after = await response.text();
  assert.match(after, /^# TYPE parley_rpc_requests_total counter$/m);
  assert.match(after, /^parley_rpc_requests_total\{[^}]*method="parley\.v1\.ChatService\/CreateChat"[^}]*code="ok"[^}]*\} \d/m);
  assert.match(after, /^parley_rpc_requests_total\{[^}]*method="parley\.v1\.ChatService\/ListChats"[^}]*code="unauthenticated"[^}]*\} \d/m);

  const delta = (labels: Record<string, string>) => metricValue(after, "parley_rpc_requests_total", labels) - metricValue(before, "parley_rpc_requests_total", labels);
  assert.is(delta({ method: "parley.v1.ChatService/CreateChat", code: "ok" }), 4, "4 successful CreateChat calls (3 Connect, 1 gRPC)");
  assert.is(delta({ method: "parley.v1.ChatService/ListChats", code: "unauthenticated" }), 2, "2 unauthenticated ListChats calls");
});

test("operations - /metrics counts the send statements (group commit): how many sends each stored and how long it took", async () => {
  const tenant = uniqueTenant("stmt");
  const alice = parleyClient(server.url, await tokenFor(tenant, "alice"), "grpc");
  const { chat } = await alice.chats.createChat({ name: "statements", memberIds: ["bob"] });
  const before = await metrics();
  await Promise.all(Array.from({ length: 5 }, (_, i) => alice.messages.sendMessage({ chatId: chat!.id, text: `together ${i}` })));
  await alice.messages.sendMessage({ chatId: chat!.id, text: "alone" });
  const after = await metrics();
  const delta = (name: string) => metricValue(after, name, {}) - metricValue(before, name, {});
  assert.is(delta("parley_send_statement_sends_sum"), 6, "every stored send counted in exactly one statement");
  const statements = delta("parley_send_statement_sends_count");
  assert.ok(statements >= 2 && statements <= 6, `2 to 6 statements for 6 sends, one of them after the others (got ${statements})`);
  assert.is(delta("parley_send_statement_seconds_count"), statements, "every statement timed");
  assert.ok(delta("parley_send_statement_seconds_sum") > 0, "statements take time");
});

// ---------------------------------------------------------------------------------------------
// Connect over plain HTTP

test("operations - Connect JSON POST ListChats with '{}' and a bearer token returns the caller's chats", async () => {
  const tenant = uniqueTenant("curl");
  const t = await tokenFor(tenant, "alice");
  const alice = parleyClient(server.url, t, "grpc");
  const { chat } = await alice.chats.createChat({ name: "curl chat", memberIds: ["bob"] });
  await alice.messages.sendMessage({ chatId: chat!.id, text: "hello" });

  const response = await fetch(`${server.url}/parley.v1.ChatService/ListChats`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${t}` },
    body: "{}",
  });
  assert.is(response.status, 200);
  assert.match(response.headers.get("content-type") ?? "", /^application\/json/);
  const body = (await response.json()) as any;
  assert.is(body.chats?.length, 1, JSON.stringify(body));
  const c = body.chats[0];
  // proto3 JSON: lowerCamelCase names, int64 as decimal strings, timestamps in RFC 3339.
  assert.is(c.id, chat!.id);
  assert.is(c.name, "curl chat");
  assert.is(c.memberCount, 2);
  assert.is(c.creatorId, "alice");
  assert.is(c.lastSequence, "1");
  assert.match(c.createTime, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/);
  assert.ok(!body.nextPageToken, "a single page has no next_page_token");

  // Also over raw HTTP/1.1, the way curl sends it.
  const raw = await http1(server.url, "POST", "/parley.v1.ChatService/GetChat", { "content-type": "application/json", authorization: `Bearer ${t}` }, JSON.stringify({ chatId: chat!.id }));
  assert.is(raw.status, 200, raw.body.toString());
  assert.is(JSON.parse(raw.body.toString()).chat.id, chat!.id);
});

// ---------------------------------------------------------------------------------------------
// Undecodable bodies

test("operations - Connect JSON that cannot be decoded is INVALID_ARGUMENT (HTTP 400), never INTERNAL", async () => {
  const bodies = ["{", "not json", "{\"name\": }", "[1, 2]", "{\"name\": 5}", "{\"memberIds\": \"bob\"}", "{\"pageSize\": \"many\"}", "\u0000\u0001"];
  const problems: string[] = [];
  for (const body of bodies) {
    const rpc = body.includes("pageSize") ? "parley.v1.ChatService/ListChats" : "parley.v1.ChatService/CreateChat";
    const response = await connectJson(rpc, body);
    const text = await response.text();
    let code = "";
    try {
      code = JSON.parse(text).code;
    } catch {}
    if (response.status !== 400 || code !== "invalid_argument") problems.push(`${rpc} ${JSON.stringify(body)}: HTTP ${response.status} ${text.slice(0, 200)}`);
    if (!noStackTrace(text)) problems.push(`${rpc} ${JSON.stringify(body)}: leaks internals: ${text.slice(0, 300)}`);
  }
  assert.equal(problems, []);
});

test("operations - Connect binary (application/proto) with bad protobuf bytes is INVALID_ARGUMENT (HTTP 400)", async () => {
  const bodies: [string, Buffer][] = [
    ["overlong varint tag", Buffer.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01])],
    ["truncated length-delimited field", Buffer.from([0x0a, 0x20, 0x61, 0x62])],
    ["invalid wire type 7", Buffer.from([0x0f, 0x00])],
    ["field number 0", Buffer.from([0x02, 0x01, 0x61])],
    ["end group without start", Buffer.from([0x0c])],
    ["random bytes", Buffer.from("b0b0ffee0000deadbeef", "hex")],
  ];
  const problems: string[] = [];
  for (const [what, body] of bodies) {
    const response = await fetch(`${server.url}/parley.v1.ChatService/CreateChat`, {
      method: "POST",
      headers: { "content-type": "application/proto", authorization: `Bearer ${token}` },
      body,
    });
    const text = await response.text();
    let code = "";
    try {
      code = JSON.parse(text).code;
    } catch {}
    if (response.status !== 400 || code !== "invalid_argument") problems.push(`${what}: HTTP ${response.status} ${text.slice(0, 200)}`);
    if (!noStackTrace(text)) problems.push(`${what}: leaks internals: ${text.slice(0, 300)}`);
  }
  assert.equal(problems, []);
});

test("operations - invalid UTF-8 in a protobuf string field is INVALID_ARGUMENT", async () => {
  // CreateChatRequest.name (field 1) = bytes C3 28, which are not UTF-8.
  const response = await fetch(`${server.url}/parley.v1.ChatService/CreateChat`, {
    method: "POST",
    headers: { "content-type": "application/proto", authorization: `Bearer ${token}` },
    body: Buffer.from([0x0a, 0x02, 0xc3, 0x28]),
  });
  const text = await response.text();
  assert.is(response.status, 400, text);
  assert.is(JSON.parse(text).code, "invalid_argument");
});

test("operations - gRPC with garbage protobuf inside a valid envelope is grpc-status 3, never INTERNAL", async () => {
  const garbage: [string, Buffer][] = [
    ["overlong varint tag", Buffer.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01])],
    ["truncated length-delimited field", Buffer.from([0x0a, 0x20, 0x61, 0x62])],
    ["invalid wire type 7", Buffer.from([0x0f, 0x00])],
    ["random bytes", Buffer.from("b0b0ffee0000deadbeef", "hex")],
  ];
  const problems: string[] = [];
  for (const [what, bytes] of garbage) {
    for (const method of ["parley.v1.ChatService/CreateChat", "parley.v1.MessageService/SendMessage"]) {
      const r = await http2Request(server.url, grpcHeaders(method), envelope(bytes));
      const status = grpcStatus(r);
      if (Number(r.headers[":status"]) !== 200 || status !== "3") {
        problems.push(`${method} ${what}: :status ${r.headers[":status"]} grpc-status ${status} ${decodeURIComponent(String(r.trailers["grpc-message"] ?? r.headers["grpc-message"] ?? ""))} rst ${r.rstCode}`);
      }
      const message = decodeURIComponent(String(r.trailers["grpc-message"] ?? r.headers["grpc-message"] ?? ""));
      if (!noStackTrace(message)) problems.push(`${method} ${what}: grpc-message leaks internals: ${message}`);
    }
  }
  assert.equal(problems, []);
});

test("operations - gRPC-Web with garbage protobuf is grpc-status 3", async () => {
  const response = await fetch(`${server.url}/parley.v1.ChatService/CreateChat`, {
    method: "POST",
    headers: { "content-type": "application/grpc-web+proto", "x-grpc-web": "1", authorization: `Bearer ${token}` },
    body: envelope(Buffer.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01])),
  });
  const body = Buffer.from(await response.arrayBuffer());
  // Trailers-only in headers, or a trailer frame (flag 0x80) in the body.
  let status = response.headers.get("grpc-status");
  for (let i = 0; status === null && i + 5 <= body.length; ) {
    const flags = body[i]!;
    const length = body.readUInt32BE(i + 1);
    const frame = body.subarray(i + 5, i + 5 + length).toString();
    if (flags & 0x80) status = /grpc-status:\s*(\d+)/i.exec(frame)?.[1] ?? null;
    i += 5 + length;
  }
  assert.is(response.status, 200);
  assert.is(status, "3", body.toString());
});

test("operations - a valid binary request still works next to the garbage", async () => {
  const response = await fetch(`${server.url}/parley.v1.ChatService/ListChats`, {
    method: "POST",
    headers: { "content-type": "application/proto", authorization: `Bearer ${token}` },
    body: Buffer.from(toBinary(ListChatsRequestSchema, create(ListChatsRequestSchema, { pageSize: 5 }))),
  });
  assert.is(response.status, 200);
  const r = await http2Request(
    server.url,
    grpcHeaders("parley.v1.ChatService/CreateChat"),
    envelope(toBinary(CreateChatRequestSchema, create(CreateChatRequestSchema, { name: "raw grpc" }))),
  );
  assert.is(grpcStatus(r), "0", JSON.stringify(r.trailers));
  const chat = fromBinary(CreateChatResponseSchema, r.body.subarray(5)).chat!;
  assert.is(chat.name, "raw grpc");
});

// ---------------------------------------------------------------------------------------------
// Unknown paths, request ids

test("operations - PARLEY_REFLECTION=off hides server reflection; on (default) it answers without a token", async () => {
  // ServerReflectionRequest{list_services: ""}: field 7, length 0.
  const listServices = envelope(Buffer.from([0x3a, 0x00]));
  const path = "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";
  const on = await http2Request(server.url, grpcHeaders(path, false), listServices);
  assert.is(on.headers[":status"], 200);
  assert.ok(on.body.includes("parley.v1.MessageService"), "default server lists the Parley services");
  const own = await startTestServer({ PARLEY_REFLECTION: "off" });
  try {
    const off = await http2Request(own.url, grpcHeaders(path, false), listServices);
    assert.is(grpcStatus(off), String(grpc.status.UNIMPLEMENTED));
    assert.not.ok(off.body.includes("parley.v1"), "nothing of the schema is revealed");
  } finally {
    await own.destroy();
  }
});

test("operations - an unknown path is 404", async () => {
  const problems: string[] = [];
  const cases: [string, string, string | undefined][] = [
    ["GET", "/no-such-path", undefined],
    ["POST", "/no-such-path", "{}"],
    ["GET", "/parley.v1.ChatService", undefined],
    ["POST", "/parley.v1.ChatService/NoSuchMethod", "{}"],
    ["POST", "/parley.v1.NoSuchService/ListChats", "{}"],
  ];
  for (const [method, p, body] of cases) {
    const r = await http1(server.url, method, p, { "content-type": "application/json", authorization: `Bearer ${token}` }, body);
    if (r.status !== 404) problems.push(`${method} ${p}: HTTP ${r.status} ${r.body.toString().slice(0, 100)}`);
  }
  assert.equal(problems, []);
});

test("operations - an unknown method over gRPC and gRPC-Web is UNIMPLEMENTED", async () => {
  for (const p of ["parley.v1.ChatService/NoSuchMethod", "parley.v1.NoSuchService/ListChats"]) {
    const grpcCall = await http2Request(server.url, grpcHeaders(p), envelope(Buffer.alloc(0)));
    assert.is(grpcCall.headers[":status"], 200, p);
    assert.is(grpcStatus(grpcCall), String(grpc.status.UNIMPLEMENTED), p);
    assert.is(grpcCall.headers["grpc-message"], `unknown method /${p}`, "readable as sent, nothing to decode");
    const web = await http1(server.url, "POST", `/${p}`, { "content-type": "application/grpc-web+proto" }, envelope(Buffer.alloc(0)));
    assert.is(web.status, 200, p);
    assert.is(web.headers["grpc-status"], String(grpc.status.UNIMPLEMENTED), p);
  }
  // A browser on an allowed origin gets past the preflight, so it can see the status.
  const preflight = await http1(server.url, "OPTIONS", "/parley.v1.ChatService/NoSuchMethod", {
    origin: "https://app.example.com", "access-control-request-method": "POST", "access-control-request-headers": "content-type,x-grpc-web",
  });
  assert.is(preflight.status, 204);
  assert.is(preflight.headers["access-control-allow-origin"], "https://app.example.com");
  const client = new grpc.Client(server.address, grpc.credentials.createInsecure());
  try {
    const error = await new Promise<grpc.ServiceError>((resolve) =>
      client.makeUnaryRequest("/parley.v1.ChatService/NoSuchMethod", (x: Buffer) => x, (x: Buffer) => x, Buffer.alloc(0),
        (e) => resolve(e!)),
    );
    assert.is(error.code, grpc.status.UNIMPLEMENTED);
  } finally {
    client.close();
  }
});

/** gRPC-Web text: every frame base64-encoded; a body may hold padded groups back to back. */
function fromBase64Groups(text: string): Buffer {
  const groups = text.replace(/\s+/g, "").match(/.{1,4}/g) ?? [];
  return Buffer.concat(groups.map((group) => Buffer.from(group, "base64")));
}

/** The frames of a binary gRPC-Web body: messages, and the trailers frame (flag 0x80) as text. */
function grpcWebFrames(body: Buffer): { messages: Buffer[]; trailers: string | undefined } {
  const messages: Buffer[] = [];
  let trailers: string | undefined;
  for (let at = 0; at + 5 <= body.length;) {
    const length = body.readUInt32BE(at + 1);
    const payload = body.subarray(at + 5, at + 5 + length);
    if (body[at]! & 0x80) trailers = payload.toString("utf8");
    else messages.push(payload);
    at += 5 + length;
  }
  return { messages, trailers };
}

test("operations - gRPC-Web text mode (application/grpc-web-text, as Google's grpc-web client sends): unary calls and server streams", async () => {
  const textHeaders = { "content-type": "application/grpc-web-text", accept: "application/grpc-web-text", "x-grpc-web": "1", authorization: `Bearer ${token}` };
  const request = (message: Uint8Array) => envelope(message).toString("base64");
  const created = await http1(server.url, "POST", "/parley.v1.ChatService/CreateChat", textHeaders,
    request(toBinary(CreateChatRequestSchema, create(CreateChatRequestSchema, { name: "text mode" }))));
  assert.is(created.status, 200);
  assert.match(String(created.headers["content-type"]), /^application\/grpc-web-text/);
  const unary = grpcWebFrames(fromBase64Groups(created.body.toString("latin1")));
  assert.match(unary.trailers ?? "", /grpc-status: ?0/i);
  const chat = fromBinary(CreateChatResponseSchema, unary.messages[0]!).chat!;
  assert.is(chat.name, "text mode");

  // A request body whose base64 does not hold a valid message: INVALID_ARGUMENT, as in binary mode.
  const statusOf = (r: RawResponse) => r.headers["grpc-status"] ?? /grpc-status: ?(\d+)/i.exec(grpcWebFrames(fromBase64Groups(r.body.toString("latin1"))).trailers ?? "")?.[1];
  const garbage = await http1(server.url, "POST", "/parley.v1.ChatService/GetChat", textHeaders, envelope(Buffer.from([0xff, 0xff, 0xff])).toString("base64"));
  assert.is(statusOf(garbage), "3");
  // Whitespace decodes to nothing, yet the text is limited too: 3 MB of it for a 1 MiB message limit.
  const padded = await http1(server.url, "POST", "/parley.v1.ChatService/CreateChat", textHeaders, " ".repeat(3_000_000));
  assert.is(statusOf(padded), "8");

  // Subscribe: Ready, then a message sent meanwhile, each frame decodable as it arrives.
  const notifications: Notification[] = [];
  let text = "";
  const stream = http.request(`${server.url}/parley.v1.NotificationService/Subscribe`, { method: "POST", headers: textHeaders, agent: false });
  stream.on("response", (res) => res.on("data", (chunk: Buffer) => {
    text += chunk.toString("latin1");
    notifications.splice(0, notifications.length,
      ...grpcWebFrames(fromBase64Groups(text)).messages.map((m) => fromBinary(NotificationSchema, m)));
  }));
  stream.on("error", () => {});
  // The envelope's header and its message as two padded base64 groups, written in pieces that split them.
  const subscribe = envelope(toBinary(SubscribeRequestSchema, create(SubscribeRequestSchema, { includeMessages: true })));
  const body = subscribe.subarray(0, 5).toString("base64") + "\r\n" + subscribe.subarray(5).toString("base64");
  assert.ok(body.indexOf("=") < body.length - 3, `padding inside the body: ${body}`);
  for (let at = 0; at < body.length; at += 3) stream.write(body.slice(at, at + 3));
  stream.end();
  try {
    await until(() => notifications.length === 1);
    assert.is(notifications[0]!.event.case, "ready");
    await parleyClient(server.url, token).messages.sendMessage({ chatId: chat.id, text: "over base64" });
    await until(() => notifications.length === 2);
    const event = notifications[1]!.event;
    assert.is(event.case, "messageCreated");
    assert.is(event.case === "messageCreated" && event.value.message?.text, "over base64");
  } finally {
    stream.destroy();
  }
});

function requestIdChecker() {
  const ids: string[] = [];
  const problems: string[] = [];
  const check = (what: string, value: unknown) => {
    if (typeof value !== "string" || value.trim() === "") problems.push(`${what}: x-request-id ${JSON.stringify(value)}`);
    else ids.push(value);
  };
  return { ids, problems, check };
}

test("operations - successful RPC responses carry a unique x-request-id header (Connect and gRPC)", async () => {
  const { ids, problems, check } = requestIdChecker();
  for (let i = 0; i < 2; i++) {
    const ok = await connectJson("parley.v1.ChatService/ListChats", "{}");
    assert.is(ok.status, 200);
    check("Connect JSON success", ok.headers.get("x-request-id") ?? undefined);
    await ok.body?.cancel();
  }
  const g = await http2Request(server.url, grpcHeaders("parley.v1.ChatService/ListChats"), envelope(new Uint8Array()));
  assert.is(grpcStatus(g), "0");
  check("gRPC success", g.headers["x-request-id"]);
  assert.equal(problems, []);
  assert.is(new Set(ids).size, ids.length, `request ids are unique: ${ids}`);
});

test("operations - error RPC responses carry an x-request-id header too", async () => {
  const { problems, check } = requestIdChecker();
  const unauthenticated = await fetch(`${server.url}/parley.v1.ChatService/ListChats`, { method: "POST", headers: { "content-type": "application/json" }, body: "{}" });
  assert.is(unauthenticated.status, 401);
  check("Connect JSON, UNAUTHENTICATED (HTTP 401)", unauthenticated.headers.get("x-request-id") ?? undefined);
  await unauthenticated.body?.cancel();
  const invalid = await connectJson("parley.v1.ChatService/CreateChat", "{");
  assert.is(invalid.status, 400);
  check("Connect JSON, undecodable body (HTTP 400)", invalid.headers.get("x-request-id") ?? undefined);
  await invalid.body?.cancel();
  const notFound = await connectJson("parley.v1.ChatService/GetChat", JSON.stringify({ chatId: "0190b3c4-0000-7000-8000-000000000000" }));
  check(`Connect JSON, HTTP ${notFound.status}`, notFound.headers.get("x-request-id") ?? undefined);
  await notFound.body?.cancel();
  const g = await http2Request(server.url, grpcHeaders("parley.v1.ChatService/ListChats", false), envelope(new Uint8Array()));
  assert.is(grpcStatus(g), "16");
  // gRPC errors may come trailers-only: the id is then among the trailers.
  check("gRPC, UNAUTHENTICATED", g.headers["x-request-id"] ?? g.trailers["x-request-id"]);
  assert.equal(problems, []);
});

// ---------------------------------------------------------------------------------------------
// gRPC health

function healthClient(address: string) {
  const definition = protoLoader.loadSync(["grpc/health/v1/health.proto"], { includeDirs: [protoDir], enums: String, defaults: true });
  const pkg = grpc.loadPackageDefinition(definition) as any;
  return new pkg.grpc.health.v1.Health(address, grpc.credentials.createInsecure()) as grpc.Client & {
    Check(req: object, cb: (e: grpc.ServiceError | null, r: { status: string }) => void): void;
  };
}

test("operations - grpc.health.v1.Health/Check via grpc-js says SERVING without a token", async () => {
  const client = healthClient(server.address);
  try {
    const response = await new Promise<{ status: string }>((resolve, reject) =>
      client.Check({ service: "" }, (error, r) => (error ? reject(error) : resolve(r))),
    );
    assert.is(response.status, "SERVING");
  } finally {
    client.close();
  }
});

test("operations - grpc.health.v1.Health/Check of an unknown service is NOT_FOUND", async () => {
  const client = healthClient(server.address);
  try {
    const error = await new Promise<grpc.ServiceError | null>((resolve) => client.Check({ service: "no.such.Service" }, (e) => resolve(e)));
    assert.is(error?.code, grpc.status.NOT_FOUND, `got ${error?.code} ${error?.details}`);
  } finally {
    client.close();
  }
});

// ---------------------------------------------------------------------------------------------
// Graceful shutdown

test("operations - graceful shutdown finishes in-flight requests, then the port refuses connections", async () => {
  const own = await startTestServer();
  try {
    const t = await tokenFor(uniqueTenant("shutdown"), "alice");
    const memberIds = Array.from({ length: 1000 }, (_, i) => `member-${i}`);
    // Warm up (first queries compile plans), so the timings below are the steady state.
    await parleyClient(own.url, t).chats.createChat({ name: "warm-up", memberIds });

    const finishedAt: number[] = [];
    const sent: Promise<void>[] = [];
    const requests: Promise<{ what: string; ok: boolean; detail: string }>[] = [];
    for (let i = 0; i < 4; i++) {
      // Connect JSON over HTTP/1.1.
      let markSent!: () => void;
      sent.push(new Promise<void>((r) => (markSent = r)));
      requests.push(
        new Promise((resolve) => {
          const req = http.request(
            `${own.url}/parley.v1.ChatService/CreateChat`,
            { method: "POST", agent: false, headers: { "content-type": "application/json", authorization: `Bearer ${t}` } },
            (res) => {
              const chunks: Buffer[] = [];
              res.on("data", (c) => chunks.push(c));
              res.on("end", () => {
                finishedAt.push(Date.now());
                const text = Buffer.concat(chunks).toString();
                let count = -1;
                try {
                  count = JSON.parse(text).chat.memberCount;
                } catch {}
                resolve({ what: `connect #${i}`, ok: res.statusCode === 200 && count === 1001, detail: `HTTP ${res.statusCode} ${text.slice(0, 100)}` });
              });
            },
          );
          req.on("error", (e) => resolve({ what: `connect #${i}`, ok: false, detail: String(e) }));
          req.end(JSON.stringify({ name: `in-flight ${i}`, memberIds }), () => markSent());
        }),
      );
      // gRPC over HTTP/2.
      let markGrpcSent!: () => void;
      sent.push(new Promise<void>((r) => (markGrpcSent = r)));
      requests.push(
        http2Request(
          own.url,
          { ...grpcHeaders("parley.v1.ChatService/CreateChat", false), authorization: `Bearer ${t}` },
          envelope(toBinary(CreateChatRequestSchema, create(CreateChatRequestSchema, { name: `in-flight grpc ${i}`, memberIds }))),
          () => markGrpcSent(),
        ).then(
          (r) => {
            finishedAt.push(Date.now());
            let count = -1;
            try {
              count = fromBinary(CreateChatResponseSchema, r.body.subarray(5)).chat!.memberCount;
            } catch {}
            return { what: `grpc #${i}`, ok: grpcStatus(r) === "0" && count === 1001, detail: `grpc-status ${grpcStatus(r)} ${r.trailers["grpc-message"] ?? ""} rst ${r.rstCode}` };
          },
          (e) => ({ what: `grpc #${i}`, ok: false, detail: String(e) }),
        ),
      );
    }
    await Promise.all(sent);
    // The embedded database runs on the server's event loop, so "written by the client" is not yet
    // "received by the server". A probe sent after them on a new connection is answered only after the
    // server has accepted and read everything that arrived before it.
    assert.is((await http1(own.url, "GET", "/healthz", {})).status, 200);
    const stopCalledAt = Date.now();
    const stopping = own.stop();
    const results = await Promise.all(requests);
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([stopping, new Promise((_, reject) => (timer = setTimeout(() => reject(new Error("stop() did not finish within 20 s")), 20_000)))]);
    clearTimeout(timer);

    assert.equal(results.filter((r) => !r.ok), [], "every in-flight request completed");
    assert.ok(finishedAt.some((f) => f > stopCalledAt), "at least one request was still running when stop() was called");

    // The port is closed now.
    const refused = await new Promise<string>((resolve) => {
      const socket = net.connect(Number(new URL(own.url).port), "127.0.0.1");
      socket.on("connect", () => {
        socket.destroy();
        resolve("connected");
      });
      socket.on("error", (e: NodeJS.ErrnoException) => resolve(e.code ?? String(e)));
    });
    assert.is(refused, "ECONNREFUSED");
    const fetchAfter = await fetch(`${own.url}/healthz`).then(
      (r) => `HTTP ${r.status}`,
      (e) => String(e.cause?.code ?? e),
    );
    assert.is(fetchAfter, "ECONNREFUSED");
  } finally {
    await own.destroy().catch(() => {});
  }
});

test.run();

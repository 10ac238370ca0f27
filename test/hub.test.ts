import http from "node:http";
import net from "node:net";
import { create } from "@bufbuild/protobuf";
import { SignJWT } from "jose";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { Order } from "../gen/parley/v1/message_pb.js";
import { NotificationSchema, type Notification } from "../gen/parley/v1/notification_pb.js";
import { TokenVerifier } from "../src/auth/token-verifier.js";
import { loadConfig } from "../src/config.js";
import { ResourceExhaustedError } from "../src/errors.js";
import { createHub } from "../src/hub/hub.js";
import type { HubServices } from "../src/hub/methods.js";
import { createLogger } from "../src/observability/logger.js";
import { Metrics } from "../src/observability/metrics.js";
import { parleyClient, type ParleyClient } from "./support/clients.js";
import { freePort, HubClient, RawHub } from "./support/hub.js";
import {
  startTestServer, TEST_SECRET, testDatabaseUrl, testNatsUrl, tokenFor, uniqueTenant, type TestServer,
} from "./support/server.js";

const ALLOWED_ORIGIN = "https://app.example.com";
const RFC3339 = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$/;

let server: TestServer;
const hubs: HubClient[] = [];
const raws: RawHub[] = [];

test.before(async () => {
  server = await startTestServer({
    PARLEY_SEND_RATE: "100000",
    PARLEY_SEND_BURST: "100000",
    PARLEY_CORS_ORIGINS: `${ALLOWED_ORIGIN}, http://localhost:5173`,
  });
});
test.after.each(async () => {
  await Promise.all(hubs.splice(0).map((h) => h.stop()));
  for (const raw of raws.splice(0)) raw.close();
});
test.after(async () => {
  await server.destroy();
});

async function connect(tenant: string, user: string, negotiate = true): Promise<HubClient> {
  const hub = await HubClient.connect(server.url, await tokenFor(tenant, user), { negotiate });
  hubs.push(hub);
  return hub;
}

async function rawConnect(tenant: string, user: string): Promise<RawHub> {
  const raw = await RawHub.connect(server.url, await tokenFor(tenant, user));
  raws.push(raw);
  return raw;
}

async function api(tenant: string, user: string, url = server.url): Promise<ParleyClient> {
  return parleyClient(url, await tokenFor(tenant, user));
}

/** A hub invocation fails with an error matching the pattern. */
async function expectError(promise: Promise<unknown>, pattern: RegExp): Promise<void> {
  try {
    await promise;
  } catch (error) {
    assert.match((error as Error).message, pattern);
    return;
  }
  assert.unreachable("invocation should have failed");
}

/** The hub still serves new clients. */
async function assertHealthy(): Promise<void> {
  const hub = await connect(uniqueTenant(), "probe", false);
  assert.is(hub.events[0]?.target, "Ready");
}

test("hub - Ready arrives first, with and without negotiation", async () => {
  const tenant = uniqueTenant();
  for (const negotiate of [true, false]) {
    const hub = await connect(tenant, "bob", negotiate);
    assert.equal(hub.events[0], { target: "Ready", arg: {} });
  }
});

test("hub - MessageCreated carries the message when another user sends through the Connect API", async () => {
  const tenant = uniqueTenant();
  const bob = await connect(tenant, "bob");
  const alice = await api(tenant, "alice");
  const { chat } = await alice.chats.createChat({ name: "team", memberIds: ["bob"] });
  const created = await bob.next("ChatCreated");
  assert.equal(created, { chatId: chat!.id, name: "team", creatorId: "alice" });
  const { message } = await alice.messages.sendMessage({ chatId: chat!.id, text: "hello bob", clientMessageId: "c-1" });
  const event = await bob.next("MessageCreated");
  assert.is(event.chatId, chat!.id);
  assert.is(event.messageId, message!.id);
  assert.is(event.sequence, "1");
  assert.is(event.senderId, "alice");
  assert.is(event.message.text, "hello bob");
  assert.is(event.message.sequence, "1");
  assert.is(event.message.clientMessageId, "c-1");
  assert.ok(RFC3339.test(event.message.createTime), event.message.createTime);
});

test("hub - MemberAdded, MemberRemoved and ReadUpdated", async () => {
  const tenant = uniqueTenant();
  const bob = await connect(tenant, "bob", false);
  const alice = await api(tenant, "alice");
  const { chat } = await alice.chats.createChat({ name: "ops", memberIds: ["bob"] });
  const chatId = chat!.id;
  await bob.next("ChatCreated");
  await alice.members.addMembers({ chatId, userIds: ["carol"] });
  assert.equal(await bob.next("MemberAdded"), { chatId, userId: "carol", addedBy: "alice" });
  await alice.members.removeMember({ chatId, userId: "carol" });
  assert.equal(await bob.next("MemberRemoved"), { chatId, userId: "carol", removedBy: "alice" });
  await alice.messages.sendMessage({ chatId, text: "one" });
  await bob.next("MessageCreated");
  await (await api(tenant, "bob")).chats.markRead({ chatId, sequence: 1n });
  assert.equal(await bob.next("ReadUpdated"), { chatId, readSequence: "1" });
  // Bob is added to a chat while connected, and removed from it.
  const { chat: other } = await alice.chats.createChat({ name: "later" });
  await alice.members.addMembers({ chatId: other!.id, userIds: ["bob"] });
  assert.equal(await bob.next("MemberAdded", (e) => e.chatId === other!.id), { chatId: other!.id, userId: "bob", addedBy: "alice" });
  await alice.members.removeMember({ chatId: other!.id, userId: "bob" });
  assert.equal(await bob.next("MemberRemoved", (e) => e.chatId === other!.id), { chatId: other!.id, userId: "bob", removedBy: "alice" });
});

test("hub - ReadUpdated goes to the user's other connections, not to the one that marked the chat read", async () => {
  const tenant = uniqueTenant();
  const phone = await connect(tenant, "bob", false);
  const laptop = await connect(tenant, "bob");
  const alice = await api(tenant, "alice");
  const { chat } = await alice.chats.createChat({ name: "devices", memberIds: ["bob"] });
  const chatId = chat!.id;
  for (let i = 1; i <= 4; i++) await alice.messages.sendMessage({ chatId, text: `m${i}` });
  await phone.next("MessageCreated", (e) => e.sequence === "4");
  await laptop.next("MessageCreated", (e) => e.sequence === "4");

  await phone.connection.invoke("MarkRead", chatId, 1);
  assert.equal(await laptop.next("ReadUpdated"), { chatId, readSequence: "1" });
  await laptop.connection.invoke("MarkRead", chatId, 2);
  assert.equal(await phone.next("ReadUpdated"), { chatId, readSequence: "2" });
  // Sent without an invocation id, the call's result never reaches the phone: its ReadUpdated does.
  await phone.connection.send("MarkRead", chatId, 3);
  await phone.next("ReadUpdated", (e) => e.readSequence === "3");
  await laptop.next("ReadUpdated", (e) => e.readSequence === "3");
  // A MarkRead that fails leaves the connection's events flowing.
  await expectError(phone.connection.invoke("MarkRead", "0190d9d4-0000-7000-8000-000000000000", 1), /not_found/);
  // A third device (a gRPC client) reaches both. Events per user arrive in order, so by now any echo of
  // a connection's own MarkRead would have arrived before this one.
  await (await api(tenant, "bob")).chats.markRead({ chatId, sequence: 4n });
  await phone.next("ReadUpdated", (e) => e.readSequence === "4");
  await laptop.next("ReadUpdated", (e) => e.readSequence === "4");
  const readUpdates = (hub: HubClient) => hub.events.filter((e) => e.target === "ReadUpdated").map((e) => e.arg.readSequence);
  assert.equal(readUpdates(phone), ["2", "3", "4"]);
  assert.equal(readUpdates(laptop), ["1", "3", "4"]);
});

test("hub - SendMessage and MarkRead return Message and Chat JSON", async () => {
  const tenant = uniqueTenant();
  const alice = await api(tenant, "alice");
  const { chat } = await alice.chats.createChat({ name: "team", memberIds: ["bob"] });
  const chatId = chat!.id;
  const bob = await connect(tenant, "bob");
  const sent = await bob.connection.invoke("SendMessage", chatId, "hi from the hub", "cmid-1");
  assert.equal(
    { ...sent, id: "", createTime: "" },
    { id: "", chatId, senderId: "bob", text: "hi from the hub", sequence: "1", createTime: "", clientMessageId: "cmid-1" },
  );
  assert.ok(RFC3339.test(sent.createTime));
  // Idempotent retry with the same client message id; the third argument is optional.
  assert.equal(await bob.connection.invoke("SendMessage", chatId, "hi from the hub", "cmid-1"), sent);
  const second = await bob.connection.invoke("sendmessage", chatId, "again");
  assert.is(second.sequence, "2");
  assert.is(second.clientMessageId, "");
  const event = await bob.next("MessageCreated", (e) => e.sequence === "2");
  assert.is(event.message.text, "again");
  await alice.messages.sendMessage({ chatId, text: "three" });
  await alice.messages.sendMessage({ chatId, text: "four" });
  const read = await bob.connection.invoke("MarkRead", chatId, "3");
  assert.is(read.id, chatId);
  assert.is(read.readSequence, "3");
  assert.is(read.lastSequence, "4");
  assert.is(read.unreadCount, "1");
  assert.is(read.memberCount, 2);
  const all = await bob.connection.invoke("MarkRead", chatId, 99);
  assert.is(all.readSequence, "4");
  assert.is(all.unreadCount, "0");
  // Non-blocking invocation: no completion, but the message is sent.
  await bob.connection.send("SendMessage", chatId, "fire and forget");
  const created = await bob.next("MessageCreated", (e) => e.message.text === "fire and forget");
  assert.is(created.sequence, "5");
});

test("hub - invocation errors come back as completions and the connection stays up", async () => {
  const tenant = uniqueTenant();
  const alice = await api(tenant, "alice");
  const { chat } = await alice.chats.createChat({ name: "private" });
  const carol = await connect(tenant, "carol");
  await expectError(carol.connection.invoke("SendMessage", chat!.id, "let me in"), /not_found: chat not found/);
  await expectError(carol.connection.invoke("MarkRead", chat!.id, 1), /not_found/);
  await expectError(carol.connection.invoke("SendMessage", "not-a-uuid", "x"), /invalid_argument: .*chat_id/);
  await expectError(carol.connection.invoke("SendMessage", chat!.id, ""), /invalid_argument: .*text/);
  await expectError(carol.connection.invoke("SendMessage", chat!.id), /invalid_argument: .*arguments/);
  await expectError(carol.connection.invoke("SendMessage", chat!.id, 42), /invalid_argument: .*text.*must be a string/);
  await expectError(carol.connection.invoke("MarkRead", chat!.id, 1.5), /invalid_argument: .*sequence/);
  await expectError(carol.connection.invoke("MarkRead", chat!.id, "-1"), /invalid_argument: .*sequence/);
  await expectError(carol.connection.invoke("DeleteEverything"), /unimplemented: unknown hub method 'DeleteEverything'/);
  // Streaming invocations are refused with an error, not ignored.
  const stream = carol.connection.stream("SendMessage", chat!.id, "x");
  const streamError = await new Promise<Error>((resolve) =>
    stream.subscribe({ next: () => {}, complete: () => resolve(new Error("completed")), error: resolve }),
  );
  assert.match(streamError.message, /unimplemented/);
  // Still connected and working.
  const { chat: own } = await alice.chats.createChat({ name: "open", memberIds: ["carol"] });
  const message = await carol.connection.invoke("SendMessage", own!.id, "I am still here");
  assert.is(message.sequence, "1");
});

test("hub - bad, expired or missing tokens fail the start with Unauthorized", async () => {
  const tenant = uniqueTenant();
  const bad = [
    await tokenFor(tenant, "bob", {}, "another-secret-0123456789abcdef-0123456789"),
    await new SignJWT({ tid: tenant }).setProtectedHeader({ alg: "HS256" }).setSubject("bob")
      .setExpirationTime(Math.floor(Date.now() / 1000) - 60).sign(new TextEncoder().encode(TEST_SECRET)),
    "not-a-jwt",
  ];
  for (const token of bad) {
    for (const negotiate of [false, true]) {
      const hub = HubClient.build(server.url, token, { negotiate });
      let error: Error | undefined;
      try {
        await hub.connection.start();
      } catch (e) {
        error = e as Error;
      }
      assert.ok(error, "start should fail");
      // Straight to the WebSocket: the Close message's error; through negotiate: its 401.
      assert.match(error!.message, negotiate ? /Unauthorized|401/ : /Unauthorized: (invalid token|token expired)/);
      assert.is(hub.connection.state, "Disconnected");
    }
  }
  // No token at all, WebSocket straight away.
  const raw = await RawHub.open(server.url);
  raws.push(raw);
  raw.send({ protocol: "json", version: 1 });
  assert.equal(await raw.next(), {});
  const close = await raw.next();
  assert.is(close.type, 7);
  assert.match(close.error, /^Unauthorized: missing bearer token/);
  await raw.waitClosed();
  // A token in the query string, as browsers send it, works.
  const viaQuery = await RawHub.open(server.url, { path: `/hubs/chat?access_token=${await tokenFor(tenant, "bob")}` });
  raws.push(viaQuery);
  viaQuery.send({ protocol: "json", version: 1 });
  assert.equal(await viaQuery.next(), {});
  assert.equal(await viaQuery.next(), { type: 1, target: "Ready", arguments: [{}] });
});

test("hub - protocol errors close the connection with an error, never the server", async () => {
  const tenant = uniqueTenant();
  // Not JSON after the handshake.
  const notJson = await rawConnect(tenant, "bob");
  notJson.send("{this is not json\x1e");
  const close1 = await notJson.nextOfType(7);
  assert.match(close1.error, /^Protocol error: .*not valid JSON/);
  assert.is(close1.allowReconnect, undefined);
  await notJson.waitClosed();
  assert.is(notJson.closeCode, 1002);

  // Invocation before the handshake: the handshake fails.
  const early = await RawHub.open(server.url, { headers: { authorization: `Bearer ${await tokenFor(tenant, "bob")}` } });
  raws.push(early);
  early.send({ type: 1, invocationId: "1", target: "SendMessage", arguments: ["x", "y"] });
  assert.match((await early.next()).error, /Handshake was expected first/);
  await early.waitClosed();

  // Unsupported protocol or version.
  for (const [request, pattern] of [
    [{ protocol: "messagepack", version: 1 }, /protocol 'messagepack' is not supported/],
    [{ protocol: "json", version: 2 }, /does not support version 2/],
  ] as const) {
    const raw = await RawHub.open(server.url, { headers: { authorization: `Bearer ${await tokenFor(tenant, "bob")}` } });
    raws.push(raw);
    raw.send(request);
    assert.match((await raw.next()).error, pattern);
    await raw.waitClosed();
  }

  // Unknown target: a completion with an error, the connection stays open.
  const unknown = await rawConnect(tenant, "bob");
  unknown.send({ type: 1, invocationId: "7", target: "Nope", arguments: [] });
  const completion = await unknown.nextOfType(3);
  assert.is(completion.invocationId, "7");
  assert.match(completion.error, /unknown hub method 'Nope'/);
  unknown.send({ type: 6 });
  // Non-blocking invocations (no invocationId) get no completion, even when they fail.
  unknown.send({ type: 1, target: "Nope", arguments: [] });
  unknown.send({ type: 1, invocationId: "8", target: "MarkRead", arguments: ["0190d9d4-0000-7000-8000-000000000000", 1] });
  const second = await unknown.nextOfType(3);
  assert.is(second.invocationId, "8");
  assert.match(second.error, /not_found/);

  // A frame over PARLEY_HUB_MAX_MESSAGE_BYTES (64 KiB by default).
  const big = await rawConnect(tenant, "bob");
  big.send(JSON.stringify({ type: 1, target: "SendMessage", arguments: ["x", "y".repeat(70 * 1024)] }) + "\x1e");
  const close2 = await big.nextOfType(7);
  assert.match(close2.error, /larger than 65536 bytes/);
  await big.waitClosed();
  assert.is(big.closeCode, 1009);

  // Invocations with the wrong shape, unknown message types, binary frames.
  for (const frame of [
    JSON.stringify({ type: 1, invocationId: "1", target: 5, arguments: [] }) + "\x1e",
    JSON.stringify({ type: 42 }) + "\x1e",
    JSON.stringify([1, 2, 3]) + "\x1e",
    Buffer.from("binary"),
  ]) {
    const raw = await rawConnect(tenant, "bob");
    raw.send(frame);
    assert.match((await raw.nextOfType(7)).error, /^Protocol error/);
    await raw.waitClosed();
  }

  await assertHealthy();
  const health = await fetch(`${server.url}/healthz`);
  assert.is(health.status, 200);
});

test("hub - WebSocket upgrades elsewhere are refused; connection gauge", async () => {
  for (const path of ["/", "/hubs/other", "/hubs/chat/negotiate"]) {
    try {
      await RawHub.open(server.url, { path });
      assert.unreachable(`upgrade to ${path} should fail`);
    } catch (error) {
      assert.is((error as { status?: number }).status, 404, path);
    }
  }
  // Browsers from origins not in PARLEY_CORS_ORIGINS cannot open the hub either.
  try {
    await RawHub.open(server.url, { headers: { origin: "https://evil.example.com" } });
    assert.unreachable("foreign origin should be refused");
  } catch (error) {
    assert.is((error as { status?: number }).status, 403);
  }
  const tenant = uniqueTenant();
  await connect(tenant, "bob");
  const raw = await RawHub.open(server.url, { headers: { origin: ALLOWED_ORIGIN, authorization: `Bearer ${await tokenFor(tenant, "bob")}` } });
  raws.push(raw);
  const metrics = await (await fetch(`${server.url}/metrics`)).text();
  const gauge = /parley_active_streams\{kind="hub"\} (\d+)/.exec(metrics);
  assert.ok(gauge && Number(gauge[1]) >= 2, metrics.split("\n").filter((l) => l.includes("active_streams")).join("\n"));
});

test("hub - upgrades other than WebSocket (curl --http2 sends Upgrade: h2c) are served as HTTP/1.1", async () => {
  const socket = net.connect(Number(new URL(server.url).port), "127.0.0.1");
  let received = "";
  socket.on("data", (d) => (received += d.toString()));
  const upgrade = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n";
  const waitFor = async (text: string) => {
    const deadline = Date.now() + 5000;
    while (!received.includes(text) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
  };
  socket.write(`GET /healthz HTTP/1.1\r\nHost: x\r\n${upgrade}\r\n`);
  await waitFor("ok\n");
  // The same connection goes on serving requests, bodies included.
  socket.write(`POST /grpc.health.v1.Health/Check HTTP/1.1\r\nHost: x\r\n${upgrade}Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}`);
  await waitFor("SERVING");
  socket.destroy();
  assert.match(received, /^HTTP\/1.1 200 OK[\s\S]*ok\n[\s\S]*HTTP\/1.1 200 OK[\s\S]*\{"status":"SERVING"\}/);
});

test("hub - negotiate: response, single-use connection tokens, 401 for a missing or bad token", async () => {
  const tenant = uniqueTenant();
  const token = await tokenFor(tenant, "bob");
  const negotiate = async (headers: Record<string, string> = {}, query = "negotiateVersion=1") =>
    fetch(`${server.url}/hubs/chat/negotiate?${query}`, { method: "POST", headers });
  const response = await negotiate({ authorization: `Bearer ${token}` });
  assert.is(response.status, 200);
  const body = (await response.json()) as any;
  assert.is(body.negotiateVersion, 1);
  assert.type(body.connectionId, "string");
  assert.match(body.connectionToken, /^[A-Za-z0-9_-]+$/);
  assert.equal(body.availableTransports, [{ transport: "WebSockets", transferFormats: ["Text"] }]);

  const headers = { authorization: `Bearer ${token}` };
  const first = await RawHub.open(server.url, { path: `/hubs/chat?id=${body.connectionToken}`, headers });
  raws.push(first);
  first.send({ protocol: "json", version: 1 });
  assert.equal(await first.next(), {});
  for (const id of [body.connectionToken, "unknown", `${body.connectionToken.slice(0, -2)}AA`]) {
    try {
      await RawHub.open(server.url, { path: `/hubs/chat?id=${id}`, headers });
      assert.unreachable("a used or unknown id must be refused");
    } catch (error) {
      assert.is((error as { status?: number }).status, 404);
    }
  }
  // Negotiate version 0: the id to connect with is in connectionId.
  const v0 = (await (await negotiate(headers, "")).json()) as any;
  assert.is(v0.connectionToken, undefined);
  const old = await RawHub.open(server.url, { path: `/hubs/chat?id=${v0.connectionId}`, headers });
  raws.push(old);

  assert.is((await negotiate({ authorization: "Bearer not-a-jwt" })).status, 401);
  assert.is((await negotiate({}, `negotiateVersion=1&access_token=bad`)).status, 401);
  const missing = await negotiate();
  assert.is(missing.status, 401);
  assert.match(await missing.text(), /Unauthorized: missing bearer token/);
  assert.is((await negotiate({}, `negotiateVersion=1&access_token=${token}`)).status, 200);
  assert.is((await fetch(`${server.url}/hubs/chat/negotiate`)).status, 405);
});

test("hub - CORS: preflight and negotiate for allowed origins only", async () => {
  const preflight = (origin: string) =>
    fetch(`${server.url}/hubs/chat/negotiate?negotiateVersion=1`, {
      method: "OPTIONS",
      headers: {
        origin,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,x-requested-with,x-signalr-user-agent",
      },
    });
  const allowed = await preflight(ALLOWED_ORIGIN);
  assert.is(allowed.status, 204);
  assert.is(allowed.headers.get("access-control-allow-origin"), ALLOWED_ORIGIN);
  assert.is(allowed.headers.get("access-control-allow-credentials"), "true");
  assert.match(allowed.headers.get("access-control-allow-methods") ?? "", /POST/);
  assert.match(allowed.headers.get("access-control-allow-headers") ?? "", /authorization/);
  assert.is((await preflight("http://localhost:5173")).status, 204);
  const denied = await preflight("https://evil.example.com");
  assert.is(denied.status, 403);
  assert.is(denied.headers.get("access-control-allow-origin"), null);

  const post = await fetch(`${server.url}/hubs/chat/negotiate?negotiateVersion=1`, {
    method: "POST",
    headers: { origin: ALLOWED_ORIGIN, authorization: `Bearer ${await tokenFor(uniqueTenant(), "bob")}` },
  });
  assert.is(post.status, 200);
  assert.is(post.headers.get("access-control-allow-origin"), ALLOWED_ORIGIN);
  const unauthorized = await fetch(`${server.url}/hubs/chat/negotiate?negotiateVersion=1`, {
    method: "POST",
    headers: { origin: ALLOWED_ORIGIN, authorization: "Bearer nope" },
  });
  assert.is(unauthorized.status, 401);
  assert.is(unauthorized.headers.get("access-control-allow-origin"), ALLOWED_ORIGIN);
});

test("hub - pings every keepalive interval, idle clients time out, automatic reconnect across a restart misses nothing", async () => {
  const port = await freePort();
  let fast = await startTestServer({
    PARLEY_PORT: String(port),
    PARLEY_SEND_RATE: "100000",
    PARLEY_SEND_BURST: "100000",
    PARLEY_HUB_KEEPALIVE_SECONDS: "0.2",
    PARLEY_HUB_TIMEOUT_SECONDS: "1.5",
  });
  const clients: HubClient[] = [];
  try {
    const tenant = uniqueTenant();
    const bobToken = await tokenFor(tenant, "bob");

    // Pings arrive on their own; a client that sends nothing is closed with an error.
    const idle = await RawHub.connect(fast.url, bobToken);
    raws.push(idle);
    const started = Date.now();
    assert.equal(await idle.next({ pings: true }), { type: 1, target: "Ready", arguments: [{}] });
    assert.equal(await idle.next({ pings: true, timeoutMs: 1000 }), { type: 6 });
    const timeout = await idle.nextOfType(7, 4000);
    assert.match(timeout.error, /Server timeout elapsed without receiving a message from the client/);
    assert.is(timeout.allowReconnect, true);
    assert.ok(Date.now() - started >= 1000, "closed too early");
    await idle.waitClosed();

    // Bob, with automatic reconnect; his token factory can hold a reconnect back.
    let hold: Promise<void> = Promise.resolve();
    let release = () => {};
    const bob = HubClient.build(fast.url, bobToken, {
      accessTokenFactory: async () => {
        await hold;
        return bobToken;
      },
      reconnect: { nextRetryDelayInMilliseconds: (ctx) => (ctx.elapsedMilliseconds < 30_000 ? 100 : null) },
      keepAliveMs: 300,
    });
    clients.push(bob);
    let reconnected = 0;
    bob.connection.onreconnected(() => reconnected++);
    await bob.connection.start();
    await bob.next("Ready");

    let alice = await api(tenant, "alice", fast.url);
    const { chat } = await alice.chats.createChat({ name: "durable", memberIds: ["bob"] });
    const chatId = chat!.id;
    await bob.next("ChatCreated");
    /** What bob has, per chat: sequence → text. */
    const have = new Map<string, Map<string, string>>([[chatId, new Map()]]);
    const record = (event: { chatId: string; sequence: string; message: { text: string } }) => {
      if (!have.has(event.chatId)) have.set(event.chatId, new Map());
      have.get(event.chatId)!.set(event.sequence, event.message.text);
    };
    await alice.messages.sendMessage({ chatId, text: "m1" });
    record(await bob.next("MessageCreated"));

    // A second raw client sees how the server says goodbye.
    const observer = await RawHub.connect(fast.url, bobToken);
    raws.push(observer);
    observer.send({ type: 6 });

    hold = new Promise((resolve) => (release = resolve));
    fast = await fast.restart();
    assert.is(fast.url, `http://127.0.0.1:${port}`);
    const goodbye = await observer.nextOfType(7);
    assert.equal(goodbye, { type: 7, error: "unavailable: server shutting down (reconnect)", allowReconnect: true });
    assert.is(bob.connection.state, "Reconnecting");

    // While bob is away: new messages and a new chat with him in it.
    alice = await api(tenant, "alice", fast.url);
    await alice.messages.sendMessage({ chatId, text: "m2" });
    await alice.messages.sendMessage({ chatId, text: "m3" });
    const { chat: chat2 } = await alice.chats.createChat({ name: "while away", memberIds: ["bob"] });
    await alice.messages.sendMessage({ chatId: chat2!.id, text: "n1" });
    release();

    // Back: Ready first, then the documented catch-up.
    await bob.next("Ready", () => true, 10_000);
    assert.is(bob.connection.state, "Connected");
    assert.is(reconnected, 1);
    const bobApi = await api(tenant, "bob", fast.url);
    const { chats } = await bobApi.chats.listChats({});
    for (const c of chats) {
      const known = have.get(c.id) ?? new Map<string, string>();
      const last = BigInt(Math.max(0, ...[...known.keys()].map(Number)));
      if (c.lastSequence <= last) continue;
      const { messages } = await bobApi.messages.listMessages({ chatId: c.id, afterSequence: last, order: Order.OLDEST_FIRST });
      for (const m of messages) record({ chatId: c.id, sequence: String(m.sequence), message: { text: m.text } });
    }
    // And live again.
    await alice.messages.sendMessage({ chatId, text: "m4" });
    record(await bob.next("MessageCreated", (e) => e.sequence === "4"));
    assert.equal([...have.get(chatId)!].sort(), [["1", "m1"], ["2", "m2"], ["3", "m3"], ["4", "m4"]]);
    assert.equal([...have.get(chat2!.id)!], [["1", "n1"]]);
    const live = bob.events.filter((e) => e.target === "MessageCreated").map((e) => e.arg.message.text);
    assert.equal(live, ["m1", "m4"]);
  } finally {
    await Promise.all(clients.map((c) => c.stop()));
    await fast.destroy();
  }
});

test("hub - a failed notification stream closes the connection with its error; heartbeats are not forwarded", async () => {
  const config = loadConfig({ PARLEY_JWT_SECRET: TEST_SECRET, PARLEY_HOST: "127.0.0.1", PARLEY_PORT: "0" });
  const log = createLogger("silent");
  const notifications = {
    async *subscribe(): AsyncGenerator<Notification> {
      yield create(NotificationSchema, { event: { case: "ready", value: {} } });
      yield create(NotificationSchema, { event: { case: "heartbeat", value: {} } });
      await new Promise((resolve) => setTimeout(resolve, 50));
      throw new ResourceExhaustedError("stream closed, the client fell more than 1000 events behind (resubscribe and catch up)");
    },
  };
  const http1 = http.createServer((req, res) => {
    if (!hub.handleHttp(req, res)) res.writeHead(404).end();
  });
  const hub = createHub({
    http1,
    verifier: await TokenVerifier.create(config, log),
    services: { notifications } as unknown as HubServices,
    config,
    log,
    metrics: new Metrics(),
    secret: new Uint8Array(32),
  });
  await new Promise<void>((resolve) => http1.listen(0, "127.0.0.1", () => resolve()));
  try {
    const url = `http://127.0.0.1:${(http1.address() as net.AddressInfo).port}`;
    const raw = await RawHub.connect(url, await tokenFor(uniqueTenant(), "bob"));
    raws.push(raw);
    assert.equal(await raw.next(), { type: 1, target: "Ready", arguments: [{}] });
    assert.equal(await raw.next(), {
      type: 7,
      error: "resource_exhausted: stream closed, the client fell more than 1000 events behind (resubscribe and catch up)",
      allowReconnect: true,
    });
    await raw.waitClosed();
  } finally {
    await hub.close();
    await new Promise((resolve) => http1.close(resolve));
  }
});

// Two instances need the real PostgreSQL and NATS (TEST_DATABASE_URL, TEST_NATS_URL).
(testDatabaseUrl && testNatsUrl ? test : test.skip)(
  "hub - negotiate on one instance, WebSocket on another (no sticky sessions), events across instances",
  async () => {
    const peer = await server.peer();
    try {
      const tenant = uniqueTenant();
      const token = await tokenFor(tenant, "bob");
      const negotiated = await fetch(`${server.url}/hubs/chat/negotiate?negotiateVersion=1`, {
        method: "POST",
        headers: { authorization: `Bearer ${token}` },
      });
      const { connectionToken } = (await negotiated.json()) as { connectionToken: string };
      const raw = await RawHub.open(peer.url, { path: `/hubs/chat?id=${connectionToken}`, headers: { authorization: `Bearer ${token}` } });
      raws.push(raw);
      raw.send({ protocol: "json", version: 1 });
      assert.equal(await raw.next(), {});
      assert.equal(await raw.next(), { type: 1, target: "Ready", arguments: [{}] });
      const alice = await api(tenant, "alice");
      const { chat } = await alice.chats.createChat({ name: "across", memberIds: ["bob"] });
      await alice.messages.sendMessage({ chatId: chat!.id, text: "from A" });
      assert.is((await raw.next()).target, "ChatCreated");
      const created = await raw.next();
      assert.is(created.target, "MessageCreated");
      assert.is(created.arguments[0].message.text, "from A");
      // The official client through negotiate on the peer.
      const hub = await HubClient.connect(peer.url, token);
      hubs.push(hub);
      assert.is((await hub.connection.invoke("SendMessage", chat!.id, "from B")).sequence, "2");
    } finally {
      await peer.stop();
    }
  },
);

test("hub - config: hub settings and CORS origins from the environment", () => {
  const base = { PARLEY_JWT_SECRET: TEST_SECRET };
  const dev = loadConfig(base);
  assert.equal(dev.hub, { keepAliveSeconds: 15, timeoutSeconds: 30, maxMessageBytes: 65536 });
  assert.equal(dev.corsOrigins, ["*"]);
  assert.equal(loadConfig({ ...base, NODE_ENV: "production" }).corsOrigins, []);
  const custom = loadConfig({
    ...base,
    PARLEY_CORS_ORIGINS: "https://App.Example.com:443/, http://localhost:5173",
    PARLEY_HUB_KEEPALIVE_SECONDS: "5",
    PARLEY_HUB_TIMEOUT_SECONDS: "12.5",
    PARLEY_HUB_MAX_MESSAGE_BYTES: "4096",
  });
  assert.equal(custom.corsOrigins, ["https://app.example.com", "http://localhost:5173"]);
  assert.equal(custom.hub, { keepAliveSeconds: 5, timeoutSeconds: 12.5, maxMessageBytes: 4096 });
  for (const [name, value] of [
    ["PARLEY_CORS_ORIGINS", "https://app.example.com/path"],
    ["PARLEY_CORS_ORIGINS", "app.example.com"],
    ["PARLEY_HUB_TIMEOUT_SECONDS", "0"],
    ["PARLEY_HUB_MAX_MESSAGE_BYTES", "12.5"],
  ]) {
    assert.throws(() => loadConfig({ ...base, [name!]: value! }), /PARLEY_/, `${name}=${value}`);
  }
});

test("hub - invocations from one connection run in order", async () => {
  const tenant = uniqueTenant();
  const alice = await api(tenant, "alice");
  const { chat } = await alice.chats.createChat({ name: "last words", memberIds: ["bob"] });
  const bob = await connect(tenant, "bob");
  const sends = Array.from({ length: 5 }, (_, i) => bob.connection.invoke("SendMessage", chat!.id, `m${i}`));
  const results = await Promise.all(sends);
  assert.equal(results.map((m) => [m.sequence, m.text]), [["1", "m0"], ["2", "m1"], ["3", "m2"], ["4", "m3"], ["5", "m4"]]);
});

test.run();

import { test } from "uvu";
import * as assert from "uvu/assert";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { compressionGzip, createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import { MessageService, type Message } from "../gen/parley/v1/message_pb.js";
import { NotificationService, type Notification } from "../gen/parley/v1/notification_pb.js";
import { bearer, grpcMetadata, grpcPackage, parleyClient, type ParleyClient, type Protocol } from "./support/clients.js";
import { startTestServer, tokenFor, uniqueTenant, type TestServer } from "./support/server.js";
import { StreamReader, until } from "./support/streams.js";

let server: TestServer;
test.before(async () => {
  server = await startTestServer({ PARLEY_SEND_RATE: "100000", PARLEY_SEND_BURST: "100000", PARLEY_HEARTBEAT_SECONDS: "0.3" });
});
test.after(async () => {
  await server.destroy();
});

async function user(tenant: string, id: string, protocol: Protocol = "connect"): Promise<ParleyClient> {
  return parleyClient(server.url, await tokenFor(tenant, id), protocol);
}

function subscribe(client: ParleyClient, includeMessages = false): StreamReader<Notification> {
  const abort = new AbortController();
  return new StreamReader(client.notifications.subscribe({ includeMessages }, { signal: abort.signal }), abort);
}

function watch(client: ParleyClient, chatId: string, afterSequence = 0n, timeoutMs?: number): StreamReader<Message> {
  const abort = new AbortController();
  return new StreamReader(client.messages.watchMessages({ chatId, afterSequence }, { signal: abort.signal, timeoutMs }), abort);
}

const isEvent = (kind: string) => (n: Notification) => n.event.case === kind;

test("subscribe - Ready first, then ChatCreated, messages with and without bodies", async () => {
  const tenant = uniqueTenant();
  const alice = await user(tenant, "alice");
  const bob = await user(tenant, "bob", "connect-http2");
  const bare = subscribe(bob);
  const full = subscribe(bob, true);
  assert.is((await bare.next()).event.case, "ready");
  assert.is((await full.next()).event.case, "ready");
  const { chat } = await alice.chats.createChat({ name: "team", memberIds: ["bob"] });
  const created = await bare.nextMatching(isEvent("chatCreated"));
  assert.equal(created.event.value, { ...created.event.value, chatId: chat!.id, name: "team", creatorId: "alice" });
  const { message } = await alice.messages.sendMessage({ chatId: chat!.id, text: "hello bob" });
  const lean = await bare.nextMatching(isEvent("messageCreated"));
  const rich = await full.nextMatching(isEvent("messageCreated"));
  if (lean.event.case !== "messageCreated" || rich.event.case !== "messageCreated") throw new Error("unreachable");
  assert.is(lean.chatId, chat!.id);
  assert.is(lean.event.value.messageId, message!.id);
  assert.is(lean.event.value.sequence, 1n);
  assert.is(lean.event.value.senderId, "alice");
  assert.is(lean.event.value.message, undefined);
  assert.is(rich.event.value.message?.text, "hello bob");
  bare.close();
  full.close();
});

test("subscribe - joins while subscribed, MemberAdded to all, nothing after removal", async () => {
  const tenant = uniqueTenant();
  const alice = await user(tenant, "alice");
  const carol = await user(tenant, "carol");
  const { chat } = await alice.chats.createChat({ name: "room", memberIds: [] });
  const aliceStream = subscribe(alice);
  const carolStream = subscribe(carol, true);
  await aliceStream.next();
  await carolStream.next();
  await alice.members.addMembers({ chatId: chat!.id, userIds: ["carol"] });
  for (const stream of [aliceStream, carolStream]) {
    const added = await stream.nextMatching(isEvent("memberAdded"));
    assert.equal([added.event.value && (added.event.value as { userId: string }).userId, (added.event.value as { addedBy: string }).addedBy], ["carol", "alice"]);
  }
  await alice.messages.sendMessage({ chatId: chat!.id, text: "welcome" });
  const welcome = await carolStream.nextMatching(isEvent("messageCreated"));
  assert.is(welcome.event.case === "messageCreated" && welcome.event.value.message?.text, "welcome");
  await alice.members.removeMember({ chatId: chat!.id, userId: "carol" });
  for (const stream of [aliceStream, carolStream]) {
    const removed = await stream.nextMatching(isEvent("memberRemoved"));
    assert.is((removed.event.value as { userId: string }).userId, "carol");
    assert.is((removed.event.value as { removedBy: string }).removedBy, "alice");
  }
  await alice.messages.sendMessage({ chatId: chat!.id, text: "after carol left" });
  await aliceStream.nextMatching(isEvent("messageCreated"));
  const late = (await carolStream.drain(400)).filter((n) => n.event.case === "messageCreated");
  assert.equal(late, [], "a removed member receives no more messages");
  aliceStream.close();
  carolStream.close();
});

test("subscribe - ReadUpdated reaches the same user's other streams; heartbeats arrive", async () => {
  const tenant = uniqueTenant();
  const alice = await user(tenant, "alice");
  const bob = await user(tenant, "bob");
  const { chat } = await alice.chats.createChat({ name: "r", memberIds: ["bob"] });
  await alice.messages.sendMessage({ chatId: chat!.id, text: "1" });
  await alice.messages.sendMessage({ chatId: chat!.id, text: "2" });
  const phone = subscribe(bob);
  const laptop = subscribe(bob);
  await phone.next();
  await laptop.next();
  await bob.chats.markRead({ chatId: chat!.id, sequence: 1n });
  // Marking read where the marker already is (or behind it) moves nothing and tells nobody.
  await bob.chats.markRead({ chatId: chat!.id, sequence: 1n });
  await bob.chats.markRead({ chatId: chat!.id, sequence: 0n });
  await bob.chats.markRead({ chatId: chat!.id, sequence: 2n });
  for (const device of [phone, laptop]) {
    const markers: bigint[] = [];
    while (markers.at(-1) !== 2n) {
      markers.push(((await device.nextMatching(isEvent("readUpdated"))).event.value as { readSequence: bigint }).readSequence);
    }
    assert.equal(markers, [1n, 2n]);
  }
  await phone.nextMatching(isEvent("heartbeat"), 2000);
  phone.close();
  laptop.close();
});

test("subscribe - a chat's messages arrive in sequence order, also when many are sent at once", async () => {
  const tenant = uniqueTenant();
  const senders = await Promise.all(["alice", "carol", "dave", "erin"].map((u) => user(tenant, u, "connect-http2")));
  const bob = await user(tenant, "bob");
  const { chat } = await senders[0]!.chats.createChat({ name: "burst", memberIds: ["bob", "carol", "dave", "erin"] });
  const chatId = chat!.id;
  const stream = subscribe(bob);
  try {
    assert.is((await stream.next()).event.case, "ready");
    // 16 sends in flight at once: they share database statements, which answer many sends at a time.
    const total = 300;
    let sent = 0;
    await Promise.all(Array.from({ length: 16 }, async (_, i) => {
      while (sent < total) {
        sent++;
        await senders[i % senders.length]!.messages.sendMessage({ chatId, text: `m${sent}` });
      }
    }));
    const sequences: number[] = [];
    while (sequences.length < total) {
      const n = await stream.next();
      if (n.event.case === "messageCreated") sequences.push(Number(n.event.value.sequence));
    }
    assert.equal(sequences, Array.from({ length: total }, (_, i) => i + 1));
  } finally {
    stream.close();
  }
});

test("watch - replays history, then live, gap-free even while sends race the replay", async () => {
  const tenant = uniqueTenant();
  const alice = await user(tenant, "alice");
  const { chat } = await alice.chats.createChat({ name: "w", memberIds: ["bob"] });
  for (let i = 0; i < 600; i++) await alice.messages.sendMessage({ chatId: chat!.id, text: `m${i + 1}` });
  const bob = await user(tenant, "bob", "connect-http2");
  const stream = watch(bob, chat!.id, 100n);
  const racing = (async () => {
    for (let i = 600; i < 700; i++) await alice.messages.sendMessage({ chatId: chat!.id, text: `m${i + 1}` });
  })();
  const seen: bigint[] = [];
  while (seen.length < 600) seen.push((await stream.next(10_000)).sequence);
  await racing;
  assert.equal(seen, Array.from({ length: 600 }, (_, i) => BigInt(i + 101)));
  assert.equal(await stream.drain(300), [], "no duplicates after the last message");
  stream.close();
});

test("watch - ends with NOT_FOUND when the caller is removed; non-member gets NOT_FOUND", async () => {
  const tenant = uniqueTenant();
  const alice = await user(tenant, "alice");
  const bob = await user(tenant, "bob");
  const { chat } = await alice.chats.createChat({ name: "x", memberIds: ["bob"] });
  const stream = watch(bob, chat!.id);
  await alice.messages.sendMessage({ chatId: chat!.id, text: "hi" });
  assert.is((await stream.next()).text, "hi");
  await alice.members.removeMember({ chatId: chat!.id, userId: "bob" });
  const error = await stream.ended_();
  assert.is(ConnectError.from(error).code, Code.NotFound);
  const outsider = watch(await user(tenant, "mallory"), chat!.id);
  assert.is(ConnectError.from(await outsider.ended_()).code, Code.NotFound);
});

test("watch - deadline is honoured with DEADLINE_EXCEEDED", async () => {
  const tenant = uniqueTenant();
  const alice = await user(tenant, "alice");
  const { chat } = await alice.chats.createChat({ name: "d" });
  const stream = watch(alice, chat!.id, 0n, 300);
  assert.is(ConnectError.from(await stream.ended_(3000)).code, Code.DeadlineExceeded);
});

test("streams - grpc-js client receives Subscribe and WatchMessages over h2c", async () => {
  const tenant = uniqueTenant();
  const alice = await user(tenant, "alice");
  const token = await tokenFor(tenant, "bob");
  const { chat } = await alice.chats.createChat({ name: "g", memberIds: ["bob"] });
  const pkg = grpcPackage();
  // grpc-js stubs are untyped: methods are looked up by name at run time.
  const messages = new pkg.parley.v1.MessageService!(server.address, grpc.credentials.createInsecure()) as any;
  const notifications = new pkg.parley.v1.NotificationService!(server.address, grpc.credentials.createInsecure()) as any;
  const watchCall = messages.watchMessages({ chatId: chat!.id, afterSequence: "0" }, grpcMetadata(token));
  const subscribeCall = notifications.subscribe({ includeMessages: true }, grpcMetadata(token));
  const watched: { sequence: string; text: string }[] = [];
  const notified: { event: string; messageCreated?: { message?: { text: string } } }[] = [];
  watchCall.on("data", (m: { sequence: string; text: string }) => watched.push(m));
  subscribeCall.on("data", (n: { event: string }) => notified.push(n));
  watchCall.on("error", () => {});
  subscribeCall.on("error", () => {});
  await until(() => notified.length > 0);
  assert.is(notified[0]!.event, "ready");
  await alice.messages.sendMessage({ chatId: chat!.id, text: "over grpc" });
  await until(() => watched.length === 1 && notified.some((n) => n.event === "messageCreated"));
  assert.is(watched[0]!.text, "over grpc");
  assert.is(watched[0]!.sequence, "1");
  assert.is(notified.find((n) => n.event === "messageCreated")!.messageCreated!.message!.text, "over grpc");
  watchCall.cancel();
  subscribeCall.cancel();
  messages.close();
  notifications.close();
});

test("streams - live events arrive intact in every protocol, codec and compression", async () => {
  // Small live events are written below Connect, encoded once for every stream; large ones under
  // gzip go through Connect (it compresses them). Both must interleave into one valid stream.
  const tenant = uniqueTenant();
  const alice = await user(tenant, "alice");
  const { chat } = await alice.chats.createChat({ name: "codecs", memberIds: ["bob"] });
  const chatId = chat!.id;
  const auth = bearer(await tokenFor(tenant, "bob"));
  const baseUrl = server.url;
  const transports: Record<string, Transport> = {};
  for (const gzip of [false, true]) {
    const compression = gzip ? { sendCompression: compressionGzip, acceptCompression: [compressionGzip] } : { acceptCompression: [] };
    const suffix = gzip ? "+gzip" : "";
    const interceptors = [auth];
    transports[`grpc${suffix}`] = createGrpcTransport({ baseUrl, interceptors, ...compression });
    transports[`grpc-web${suffix}`] = createGrpcWebTransport({ baseUrl, httpVersion: "1.1", interceptors, ...compression });
    transports[`connect-binary-h1${suffix}`] = createConnectTransport({ baseUrl, httpVersion: "1.1", useBinaryFormat: true, interceptors, ...compression });
    transports[`connect-binary-h2${suffix}`] = createConnectTransport({ baseUrl, httpVersion: "2", useBinaryFormat: true, interceptors, ...compression });
    transports[`connect-json${suffix}`] = createConnectTransport({ baseUrl, httpVersion: "1.1", interceptors, ...compression });
  }
  const streams = Object.entries(transports).map(([name, transport]) => {
    const [subscribeAbort, watchAbort] = [new AbortController(), new AbortController()];
    return {
      name,
      subscription: new StreamReader(
        createClient(NotificationService, transport).subscribe({ includeMessages: true }, { signal: subscribeAbort.signal }),
        subscribeAbort,
      ),
      watch: new StreamReader(createClient(MessageService, transport).watchMessages({ chatId }, { signal: watchAbort.signal }), watchAbort),
    };
  });
  for (const { name, subscription } of streams) assert.is((await subscription.next()).event.case, "ready", name);
  const texts = Array.from({ length: 12 }, (_, i) => (i % 3 === 2 ? `large ${i} ` + "é".repeat(1500) : `small ${i}`));
  for (const text of texts) await alice.messages.sendMessage({ chatId, text });
  for (const { name, subscription, watch } of streams) {
    const watched: string[] = [];
    for (let i = 0; i < texts.length; i++) {
      const message = await watch.next();
      assert.is(message.sequence, BigInt(i + 1), `${name}: watch sequence`);
      watched.push(message.text);
    }
    assert.equal(watched, texts, `${name}: watched texts`);
    const notified: string[] = [];
    while (notified.length < texts.length) {
      const n = await subscription.next();
      if (n.event.case === "messageCreated") notified.push(n.event.value.message!.text);
    }
    assert.equal(notified, texts, `${name}: notified texts`);
    subscription.close();
    watch.close();
  }
});

test("streams - cancelled streams release their bus subscriptions", async () => {
  const tenant = uniqueTenant();
  const alice = await user(tenant, "alice");
  const { chat } = await alice.chats.createChat({ name: "c" });
  await until(() => server.server.fanout.subscriptionCount === 0, 3000).catch(() => {});
  const before = server.server.fanout.subscriptionCount;
  const streams = [subscribe(alice), subscribe(alice, true), watch(alice, chat!.id), watch(alice, chat!.id)];
  await streams[0]!.next();
  await streams[1]!.next();
  await alice.messages.sendMessage({ chatId: chat!.id, text: "x" });
  await streams[2]!.next();
  await streams[3]!.next();
  // user subject + chat subject, each shared by the streams that need it
  assert.is(server.server.fanout.subscriptionCount, before + 2);
  for (const s of streams) s.close();
  await until(() => server.server.fanout.subscriptionCount === before, 3000);
  const metrics = await (await fetch(`${server.url}/metrics`)).text();
  assert.match(metrics, /parley_active_streams\{kind="subscribe"\} 0/);
  assert.match(metrics, /parley_active_streams\{kind="watch"\} 0/);
});

test("streams - server shutdown ends open streams with UNAVAILABLE", async () => {
  const own = await startTestServer();
  try {
    const tenant = uniqueTenant();
    const alice = parleyClient(own.url, await tokenFor(tenant, "alice"), "connect-http2");
    const { chat } = await alice.chats.createChat({ name: "s" });
    const sub = new StreamReader(alice.notifications.subscribe({}));
    const w = new StreamReader(alice.messages.watchMessages({ chatId: chat!.id }));
    await sub.next();
    await own.stop();
    assert.is(ConnectError.from(await sub.ended_()).code, Code.Unavailable);
    assert.is(ConnectError.from(await w.ended_()).code, Code.Unavailable);
  } finally {
    await own.destroy().catch(() => {});
  }
});

test("streams - a user's concurrent streams are capped with RESOURCE_EXHAUSTED; closing one frees a slot", async () => {
  const own = await startTestServer({ PARLEY_MAX_STREAMS_PER_USER: "2" });
  try {
    const tenant = uniqueTenant();
    const alice = parleyClient(own.url, await tokenFor(tenant, "alice"), "connect-http2");
    const bob = parleyClient(own.url, await tokenFor(tenant, "bob"), "connect-http2");
    const { chat } = await alice.chats.createChat({ name: "cap", memberIds: ["bob"] });
    const first = subscribe(alice);
    const second = new StreamReader(alice.messages.watchMessages({ chatId: chat!.id }), new AbortController());
    await first.next();
    await alice.messages.sendMessage({ chatId: chat!.id, text: "x" });
    await second.next();
    const third = subscribe(alice);
    assert.is(ConnectError.from(await third.ended_()).code, Code.ResourceExhausted);
    const other = subscribe(bob);
    assert.is((await other.next()).event.case, "ready", "the cap is per user");
    first.close();
    await first.ended_();
    // The server frees the slot when it sees the cancellation, a moment after the client gave up.
    let retry = subscribe(alice);
    for (let attempt = 0; attempt < 20 && (await retry.next().then(() => false, () => true)); attempt++) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      retry = subscribe(alice);
    }
    assert.is(retry.error, undefined, "a freed slot can be used again");
    for (const s of [second, other, retry]) s.close();
  } finally {
    await own.destroy();
  }
});

test.run();

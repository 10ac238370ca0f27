import { test } from "uvu";
import * as assert from "uvu/assert";
import { Code, ConnectError } from "@connectrpc/connect";
import { Order, type Message } from "../gen/parley/v1/message_pb.js";
import type { Notification } from "../gen/parley/v1/notification_pb.js";
import { parleyClient } from "./support/clients.js";
import { startTestServer, testDatabaseUrl, testNatsUrl, tokenFor, uniqueTenant, type TestServer } from "./support/server.js";
import { StreamReader } from "./support/streams.js";

// Two instances share one PostgreSQL database and one NATS: only possible with the real services.
const enabled = Boolean(testDatabaseUrl && testNatsUrl);
if (!enabled) {
  console.log("!!! SKIPPED multi-instance suite: set TEST_DATABASE_URL and TEST_NATS_URL (.ci/run does) !!!");
}
const it = enabled ? test : test.skip;

let a: TestServer;
let b: TestServer;
test.before(async () => {
  if (!enabled) return;
  a = await startTestServer({ PARLEY_SEND_RATE: "100000", PARLEY_SEND_BURST: "100000" });
  b = await a.peer();
});
test.after(async () => {
  if (!enabled) return;
  await b.destroy();
  await a.destroy();
});

it("instances - a subscriber on A gets every message sent through B, in order, exactly once", async () => {
  const tenant = uniqueTenant();
  const aliceOnB = parleyClient(b.url, await tokenFor(tenant, "alice"), "grpc");
  const bobOnA = parleyClient(a.url, await tokenFor(tenant, "bob"), "grpc");
  const { chat } = await aliceOnB.chats.createChat({ name: "two instances", memberIds: ["bob"] });
  const notifications = new StreamReader<Notification>(bobOnA.notifications.subscribe({ includeMessages: true }));
  const watched = new StreamReader<Message>(bobOnA.messages.watchMessages({ chatId: chat!.id }));
  assert.is((await notifications.next()).event.case, "ready");
  const senders = Array.from({ length: 5 }, (_, s) => (async () => {
    for (let i = 0; i < 40; i++) await aliceOnB.messages.sendMessage({ chatId: chat!.id, text: `s${s}-${i}` });
  })());
  await Promise.all(senders);
  const sequences: bigint[] = [];
  while (sequences.length < 200) sequences.push((await watched.next(10_000)).sequence);
  assert.equal(sequences, Array.from({ length: 200 }, (_, i) => BigInt(i + 1)));
  const created: bigint[] = [];
  while (created.length < 200) {
    const n = await notifications.nextMatching((e) => e.event.case === "messageCreated", 10_000);
    if (n.event.case === "messageCreated") created.push(n.event.value.sequence);
  }
  assert.equal([...created].sort((x, y) => Number(x - y)), sequences, "each message notified exactly once");
  assert.equal(await watched.drain(300), []);
  notifications.close();
  watched.close();
});

it("instances - membership changes made on B take effect for streams on A", async () => {
  const tenant = uniqueTenant();
  const aliceOnB = parleyClient(b.url, await tokenFor(tenant, "alice"), "connect");
  const carolOnA = parleyClient(a.url, await tokenFor(tenant, "carol"), "connect-http2");
  const { chat } = await aliceOnB.chats.createChat({ name: "join me" });
  const stream = new StreamReader<Notification>(carolOnA.notifications.subscribe({ includeMessages: true }));
  await stream.next();
  await aliceOnB.members.addMembers({ chatId: chat!.id, userIds: ["carol"] });
  await stream.nextMatching((n) => n.event.case === "memberAdded");
  const watch = new StreamReader<Message>(carolOnA.messages.watchMessages({ chatId: chat!.id }));
  await aliceOnB.messages.sendMessage({ chatId: chat!.id, text: "hello carol" });
  const got = await stream.nextMatching((n) => n.event.case === "messageCreated");
  assert.is(got.event.case === "messageCreated" && got.event.value.message?.text, "hello carol");
  assert.is((await watch.next()).text, "hello carol");
  await aliceOnB.members.removeMember({ chatId: chat!.id, userId: "carol" });
  await stream.nextMatching((n) => n.event.case === "memberRemoved");
  assert.is(ConnectError.from(await watch.ended_()).code, Code.NotFound);
  await aliceOnB.messages.sendMessage({ chatId: chat!.id, text: "carol is gone" });
  const after = (await stream.drain(500)).filter((n) => n.event.case === "messageCreated");
  assert.equal(after, []);
  stream.close();
});

it("instances - the same client_message_id sent through A and B at once is stored once, without gaps", async () => {
  const tenant = uniqueTenant();
  const aliceOnA = parleyClient(a.url, await tokenFor(tenant, "alice"), "grpc");
  const aliceOnB = parleyClient(b.url, await tokenFor(tenant, "alice"), "grpc");
  const { chat } = await aliceOnA.chats.createChat({ name: "retries on two instances" });
  // Each instance stores concurrent sends together in one statement; the two statements race on the
  // same client_message_ids, and a lost race must not leave a hole in the numbering.
  const sends = [];
  for (let i = 0; i < 150; i++) {
    const cmid = i % 3 === 0 ? `shared-${i}` : `own-${i}`;
    sends.push(aliceOnA.messages.sendMessage({ chatId: chat!.id, text: `a${i}`, clientMessageId: `a-${cmid}` }));
    sends.push(aliceOnB.messages.sendMessage({ chatId: chat!.id, text: `b${i}`, clientMessageId: `b-${cmid}` }));
    if (i % 3 === 0) {
      sends.push(aliceOnA.messages.sendMessage({ chatId: chat!.id, text: `s${i}`, clientMessageId: cmid }));
      sends.push(aliceOnB.messages.sendMessage({ chatId: chat!.id, text: `s${i}`, clientMessageId: cmid }));
    }
  }
  const answers = (await Promise.all(sends)).map((r) => r.message!);
  const byCmid = new Map<string, Set<string>>();
  for (const m of answers) byCmid.set(m.clientMessageId, (byCmid.get(m.clientMessageId) ?? new Set()).add(m.id));
  for (const [cmid, ids] of byCmid) assert.is(ids.size, 1, `${cmid}: one message for both sends`);
  const stored: Message[] = [];
  let pageToken = "";
  do {
    const page = await aliceOnA.messages.listMessages({ chatId: chat!.id, pageSize: 100, order: Order.OLDEST_FIRST, pageToken });
    stored.push(...page.messages);
    pageToken = page.nextPageToken;
  } while (pageToken);
  assert.is(stored.length, byCmid.size, "each client_message_id stored once");
  assert.equal(stored.map((m) => m.sequence), stored.map((_, k) => BigInt(k + 1)), "sequences 1..N");
});

test.run();

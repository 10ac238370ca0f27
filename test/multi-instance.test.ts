import { test } from "uvu";
import * as assert from "uvu/assert";
import { Code, ConnectError } from "@connectrpc/connect";
import type { Message } from "../gen/parley/v1/message_pb.js";
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

test.run();

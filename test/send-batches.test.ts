// Concurrent sends share database statements (group commit, src/store/message-store.ts). Whatever
// lands in one statement, every chat must still be numbered 1..N without gaps, a repeated
// client_message_id stored once, and a non-member refused without taking a number.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { Code, ConnectError } from "@connectrpc/connect";
import { Order, type Message } from "../gen/parley/v1/message_pb.js";
import { parleyClient, type ParleyClient } from "./support/clients.js";
import { startTestServer, tokenFor, uniqueTenant, type TestServer } from "./support/server.js";

let server: TestServer;
test.before(async () => {
  server = await startTestServer({ PARLEY_SEND_RATE: "100000", PARLEY_SEND_BURST: "100000" });
});
test.after(async () => {
  await server?.destroy();
});

async function history(client: ParleyClient, chatId: string): Promise<Message[]> {
  const messages: Message[] = [];
  let pageToken = "";
  do {
    const page = await client.messages.listMessages({ chatId, pageSize: 100, order: Order.OLDEST_FIRST, pageToken });
    messages.push(...page.messages);
    pageToken = page.nextPageToken;
  } while (pageToken);
  return messages;
}

test("sends - a burst into six chats: each chat 1..N, retries stored once, non-members take no number", async () => {
  const tenant = uniqueTenant("batch");
  const alice = parleyClient(server.url, await tokenFor(tenant, "alice"), "grpc");
  const bob = parleyClient(server.url, await tokenFor(tenant, "bob"), "grpc");
  const carol = parleyClient(server.url, await tokenFor(tenant, "carol"), "grpc");
  const chats = await Promise.all(
    Array.from({ length: 6 }, async (_, c) => (await alice.chats.createChat({ name: `burst ${c}`, memberIds: c === 5 ? ["bob", "carol"] : ["bob"] })).chat!),
  );

  const sends: { chat: number; sender: ParleyClient; cmid: string; text: string }[] = [];
  for (let i = 0; i < 300; i++) sends.push({ chat: i % 6, sender: i % 2 ? bob : alice, cmid: `m-${i}`, text: `message ${i}` });
  // The same sends again, in the same burst (a client retrying before its first answer came back).
  for (let i = 0; i < 40; i++) sends.push({ ...sends[i * 7]! });
  const accepted = sends.map((s) =>
    s.sender.messages.sendMessage({ chatId: chats[s.chat]!.id, text: s.text, clientMessageId: s.cmid }).then((r) => r.message!));
  // Carol belongs only to the last chat.
  const refused = chats.slice(0, 5).map((chat) =>
    carol.messages.sendMessage({ chatId: chat.id, text: "not a member" }).then(() => "stored", (e) => ConnectError.from(e).code));
  const carolsOwn = carol.messages.sendMessage({ chatId: chats[5]!.id, text: "carol is a member" });
  const stored = await Promise.all(accepted);
  assert.equal(await Promise.all(refused), [Code.NotFound, Code.NotFound, Code.NotFound, Code.NotFound, Code.NotFound]);
  const carolsMessage = (await carolsOwn).message!;

  for (let i = 0; i < 40; i++) {
    assert.is(stored[300 + i]!.id, stored[i * 7]!.id, `retry of m-${i * 7} returns the first send's message`);
  }
  for (let c = 0; c < 6; c++) {
    const expectedTexts = new Set(sends.filter((s) => s.chat === c).map((s) => s.text));
    if (c === 5) expectedTexts.add("carol is a member");
    const messages = await history(alice, chats[c]!.id);
    assert.equal(messages.map((m) => m.sequence), messages.map((_, k) => BigInt(k + 1)), `chat ${c}: sequences 1..N`);
    assert.equal(new Set(messages.map((m) => m.text)), expectedTexts, `chat ${c}: every message once, nothing else`);
    assert.is(messages.length, expectedTexts.size, `chat ${c}: no duplicates`);
    for (let k = 1; k < messages.length; k++) {
      const earlier = messages[k - 1]!.createTime!;
      const later = messages[k]!.createTime!;
      assert.ok(earlier.seconds < later.seconds || (earlier.seconds === later.seconds && earlier.nanos <= later.nanos), `chat ${c}: time order is sequence order`);
    }
    const details = (await alice.chats.getChat({ chatId: chats[c]!.id })).chat!;
    assert.is(details.lastSequence, BigInt(messages.length), `chat ${c}: last_sequence`);
  }
  assert.is(carolsMessage.chatId, chats[5]!.id);
  stored.forEach((message, i) => assert.is(message.chatId, chats[sends[i]!.chat]!.id, "each answer is its own send's message"));
});

test("sends - half of a burst with 1 ms deadlines: those time out or succeed, every other send succeeds, no gaps", async () => {
  const tenant = uniqueTenant("batch");
  const alice = parleyClient(server.url, await tokenFor(tenant, "alice"), "grpc");
  const { chat } = await alice.chats.createChat({ name: "deadlines" });
  // Many sends at once: most wait behind the running statement; a 1 ms deadline expires there.
  const outcomes = await Promise.all(Array.from({ length: 200 }, (_, i) =>
    alice.messages.sendMessage({ chatId: chat!.id, text: `t${i}` }, { timeoutMs: i % 2 ? 1 : 30_000 }).then(
      (r) => ({ ok: true as const, text: r.message!.text }),
      (e) => ({ ok: false as const, code: ConnectError.from(e).code }),
    )));
  for (const o of outcomes) if (!o.ok) assert.is(o.code, Code.DeadlineExceeded);
  const confirmed = outcomes.filter((o) => o.ok).map((o) => (o as { text: string }).text);
  assert.ok(outcomes.every((o, i) => o.ok || i % 2 === 1), "every send without a short deadline succeeds");
  const messages = await history(alice, chat!.id);
  assert.equal(messages.map((m) => m.sequence), messages.map((_, k) => BigInt(k + 1)), "no gaps");
  for (const text of confirmed) assert.ok(messages.some((m) => m.text === text), `${text} stored`);
});

test.run();

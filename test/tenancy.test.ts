// Tenant isolation against the contract (/work/shared/api.md): "The tenant comes ONLY from the verified
// token ... Ids from another tenant behave exactly like ids that do not exist."
import { Code, ConnectError } from "@connectrpc/connect";
import { test } from "uvu";
import * as assert from "uvu/assert";
import type { Chat } from "../gen/parley/v1/chat_pb.js";
import type { Member } from "../gen/parley/v1/member_pb.js";
import { Order, type Message } from "../gen/parley/v1/message_pb.js";
import { parleyClient, type ParleyClient, type Protocol } from "./support/clients.js";
import { startTestServer, tokenFor, uniqueTenant, type TestServer } from "./support/server.js";

// ---------------------------------------------------------------------------------------------
// Helpers

type Outcome = { code: "ok" | keyof typeof Code; message: string };

async function outcome(promise: Promise<unknown>): Promise<Outcome> {
  try {
    await promise;
    return { code: "ok", message: "" };
  } catch (error) {
    const e = ConnectError.from(error);
    return { code: Code[e.code] as keyof typeof Code, message: e.rawMessage };
  }
}

/** The first item of a server stream (or its error), with a deadline. */
async function firstOfStream(stream: (signal: AbortSignal) => AsyncIterable<unknown>, ms = 5000): Promise<unknown> {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), ms);
  try {
    for await (const item of stream(controller.signal)) {
      controller.abort();
      return item;
    }
    return undefined;
  } finally {
    clearTimeout(timer);
    controller.abort();
  }
}

/** A well-formed id of the same shape as `id` that nobody has: the last characters randomized in kind. */
function lookalike(id: string): string {
  const chars = id.split("");
  let changed = 0;
  for (let i = chars.length - 1; i >= 0 && changed < 10; i--) {
    const c = chars[i]!;
    if (/[0-9]/.test(c)) chars[i] = String(Math.floor(Math.random() * 10));
    else if (/[a-f]/.test(c)) chars[i] = "0123456789abcdef"[Math.floor(Math.random() * 16)]!;
    else if (/[A-F]/.test(c)) chars[i] = "0123456789ABCDEF"[Math.floor(Math.random() * 16)]!;
    else continue;
    changed++;
  }
  const result = chars.join("");
  return result === id ? lookalike(id) : result;
}


function chatView(c: Chat | undefined) {
  return c && {
    id: c.id,
    name: c.name,
    memberCount: c.memberCount,
    creatorId: c.creatorId,
    lastSequence: String(c.lastSequence),
    lastMessageTime: c.lastMessageTime ? `${c.lastMessageTime.seconds}.${c.lastMessageTime.nanos}` : "",
    readSequence: String(c.readSequence),
    unreadCount: String(c.unreadCount),
  };
}
const memberView = (m: Member) => ({ userId: m.userId, addedBy: m.addedBy, joinTime: m.joinTime ? `${m.joinTime.seconds}.${m.joinTime.nanos}` : "" });
const messageView = (m: Message) => ({
  id: m.id,
  chatId: m.chatId,
  senderId: m.senderId,
  text: m.text,
  sequence: String(m.sequence),
  clientMessageId: m.clientMessageId,
});

async function allChats(client: ParleyClient, pageSize = 0): Promise<Chat[]> {
  const out: Chat[] = [];
  let pageToken = "";
  for (let i = 0; i < 100; i++) {
    const r = await client.chats.listChats({ pageSize, pageToken });
    out.push(...r.chats);
    if (!r.nextPageToken) return out;
    pageToken = r.nextPageToken;
  }
  throw new Error("ListChats never ended");
}

async function allMembers(client: ParleyClient, chatId: string, pageSize = 0): Promise<Member[]> {
  const out: Member[] = [];
  let pageToken = "";
  for (let i = 0; i < 100; i++) {
    const r = await client.members.listMembers({ chatId, pageSize, pageToken });
    out.push(...r.members);
    if (!r.nextPageToken) return out;
    pageToken = r.nextPageToken;
  }
  throw new Error("ListMembers never ended");
}

async function allMessages(client: ParleyClient, chatId: string, pageSize = 0, order = Order.OLDEST_FIRST): Promise<Message[]> {
  const out: Message[] = [];
  let pageToken = "";
  for (let i = 0; i < 1000; i++) {
    const r = await client.messages.listMessages({ chatId, pageSize, pageToken, order });
    out.push(...r.messages);
    if (!r.nextPageToken) return out;
    pageToken = r.nextPageToken;
  }
  throw new Error("ListMessages never ended");
}

/** Everything the given members can see of a chat. */
async function snapshot(chatId: string, viewers: ParleyClient[]) {
  const chats = [];
  for (const v of viewers) chats.push(chatView((await v.chats.getChat({ chatId })).chat));
  return {
    chats,
    members: (await allMembers(viewers[0]!, chatId)).map(memberView),
    messages: (await allMessages(viewers[0]!, chatId)).map(messageView),
  };
}

// ---------------------------------------------------------------------------------------------
// One server for the file; three tenants with the same user ids.

let server: TestServer;
const USERS = ["alice", "bob", "carol", "dave"] as const;
type User = (typeof USERS)[number];

interface Tenant {
  id: string;
  as: Record<User, ParleyClient>;
  asGrpc: Record<User, ParleyClient>;
}

async function makeTenant(label: string): Promise<Tenant> {
  const id = uniqueTenant(label);
  const as = {} as Record<User, ParleyClient>;
  const asGrpc = {} as Record<User, ParleyClient>;
  for (const u of USERS) {
    const token = await tokenFor(id, u);
    as[u] = parleyClient(server.url, token, "connect");
    asGrpc[u] = parleyClient(server.url, token, "grpc");
  }
  return { id, as, asGrpc };
}

/** A fixed scene, built identically in every tenant: same names, same users, same client_message_ids. */
interface Scene {
  general: string; // alice + bob
  random: string; // alice + carol
  messages: string[]; // in general: alice "hello" (m-1), bob "hi" (m-1)
}
let tenants: Tenant[];
const scenes = new Map<string, Scene>();

async function buildScene(t: Tenant): Promise<Scene> {
  const general = (await t.as.alice.chats.createChat({ name: "general", memberIds: ["bob", "bob"] })).chat!.id;
  const random = (await t.as.alice.chats.createChat({ name: "random", memberIds: ["carol"] })).chat!.id;
  const m1 = (await t.as.alice.messages.sendMessage({ chatId: general, text: "hello", clientMessageId: "m-1" })).message!;
  const m2 = (await t.as.bob.messages.sendMessage({ chatId: general, text: "hi", clientMessageId: "m-1" })).message!;
  const retry = (await t.as.alice.messages.sendMessage({ chatId: general, text: "hello", clientMessageId: "m-1" })).message!;
  assert.is(retry.id, m1.id, "a retry with the same client_message_id returns the original message");
  return { general, random, messages: [m1.id, m2.id] };
}

test.before(async () => {
  // Generous rate limits: the randomized part sends quickly.
  server = await startTestServer({ PARLEY_SEND_RATE: "1000000", PARLEY_SEND_BURST: "1000000" });
  try {
    tenants = [await makeTenant("ta"), await makeTenant("tb"), await makeTenant("tc")];
    for (const t of tenants) scenes.set(t.id, await buildScene(t));
  } catch (error) {
    await server.destroy();
    throw error;
  }
});

test.after(async () => {
  await server?.destroy();
});

// ---------------------------------------------------------------------------------------------

test("tenancy - tenants reusing user ids, chat names and client_message_ids see only their own data", async () => {
  const allChatIds = new Set<string>();
  const allMessageIds = new Set<string>();
  for (const t of tenants) {
    const s = scenes.get(t.id)!;
    allChatIds.add(s.general).add(s.random);
    s.messages.forEach((m) => allMessageIds.add(m));

    const ids = async (u: User) => (await allChats(t.as[u])).map((c) => c.id).sort();
    assert.equal(await ids("alice"), [s.general, s.random].sort(), `${t.id}: alice's chats`);
    assert.equal(await ids("bob"), [s.general], `${t.id}: bob's chats`);
    assert.equal(await ids("carol"), [s.random], `${t.id}: carol's chats`);
    assert.equal(await ids("dave"), [], `${t.id}: dave's chats`);

    const general = (await t.as.bob.chats.getChat({ chatId: s.general })).chat!;
    assert.equal(
      { name: general.name, memberCount: general.memberCount, creatorId: general.creatorId, lastSequence: general.lastSequence },
      { name: "general", memberCount: 2, creatorId: "alice", lastSequence: 2n },
    );
    assert.equal((await allMembers(t.as.bob, s.general)).map((m) => m.userId), ["alice", "bob"]);
    assert.equal((await allMembers(t.asGrpc.carol, s.random)).map((m) => m.userId), ["alice", "carol"]);
    const messages = await allMessages(t.as.alice, s.general);
    assert.equal(messages.map((m) => [m.id, m.senderId, m.text, m.sequence, m.clientMessageId]), [
      [s.messages[0], "alice", "hello", 1n, "m-1"],
      [s.messages[1], "bob", "hi", 2n, "m-1"],
    ]);
    for (const id of s.messages) {
      assert.is((await t.asGrpc.bob.messages.getMessage({ chatId: s.general, messageId: id })).message!.id, id);
    }
  }
  assert.is(allChatIds.size, tenants.length * 2, "chat ids are unique across tenants");
  assert.is(allMessageIds.size, tenants.length * 2, "message ids are unique across tenants");
});

/** Every read and write RPC on a chat, as one user; for comparing a foreign id with a non-existent one. */
function probes(c: ParleyClient, chatId: string, messageId: string, ownChatId: string): Record<string, () => Promise<unknown>> {
  return {
    GetChat: () => c.chats.getChat({ chatId }),
    MarkRead: () => c.chats.markRead({ chatId, sequence: 1n }),
    ListMembers: () => c.members.listMembers({ chatId }),
    AddMembers: () => c.members.addMembers({ chatId, userIds: ["mallory"] }),
    "RemoveMember(other)": () => c.members.removeMember({ chatId, userId: "bob" }),
    "RemoveMember(self)": () => c.members.removeMember({ chatId, userId: "alice" }),
    SendMessage: () => c.messages.sendMessage({ chatId, text: "intrusion" }),
    "SendMessage(client_message_id)": () => c.messages.sendMessage({ chatId, text: "hello", clientMessageId: "m-1" }),
    ListMessages: () => c.messages.listMessages({ chatId }),
    "ListMessages(oldest first, after 0)": () => c.messages.listMessages({ chatId, order: Order.OLDEST_FIRST, afterSequence: 0n }),
    GetMessage: () => c.messages.getMessage({ chatId, messageId }),
    "GetMessage(own chat, foreign message)": () => c.messages.getMessage({ chatId: ownChatId, messageId }),
    WatchMessages: () => firstOfStream((signal) => c.messages.watchMessages({ chatId, afterSequence: 0n }, { signal })),
  };
}

for (const protocol of ["connect", "grpc"] as const satisfies readonly Protocol[]) {
  test(`tenancy - another tenant's chat and message ids are NOT_FOUND exactly like unknown ids (${protocol})`, async () => {
    const [a, b] = tenants as [Tenant, Tenant];
    const victim = scenes.get(a.id)!;
    const own = scenes.get(b.id)!;
    const attacker = protocol === "grpc" ? b.asGrpc.alice : b.as.alice;
    const fakeChat = lookalike(victim.general);
    const fakeMessage = lookalike(victim.messages[0]!);
    const real = probes(attacker, victim.general, victim.messages[0]!, own.general);
    const fake = probes(attacker, fakeChat, fakeMessage, own.general);
    const problems: string[] = [];
    for (const name of Object.keys(real)) {
      const r = await outcome(real[name]!());
      const f = await outcome(fake[name]!());
      const normalize = (o: Outcome) => ({
        code: o.code,
        message: o.message.replaceAll(victim.general, "<chat>").replaceAll(fakeChat, "<chat>").replaceAll(victim.messages[0]!, "<msg>").replaceAll(fakeMessage, "<msg>"),
      });
      if (r.code !== "NotFound") problems.push(`${name} with tenant A's ids: ${r.code} ${r.message}`);
      if (f.code !== "NotFound") problems.push(`${name} with unknown ids: ${f.code} ${f.message}`);
      if (JSON.stringify(normalize(r)) !== JSON.stringify(normalize(f))) {
        problems.push(`${name}: foreign id answer ${JSON.stringify(r)} differs from unknown id answer ${JSON.stringify(f)}`);
      }
    }
    assert.equal(problems, []);
  });
}

test("tenancy - writes to another tenant's chat are NOT_FOUND and change nothing", async () => {
  const [a, b, c] = tenants as [Tenant, Tenant, Tenant];
  const victim = scenes.get(a.id)!;
  const viewers = [a.as.alice, a.as.bob];
  const before = await snapshot(victim.general, viewers);
  const beforeRandom = await snapshot(victim.random, [a.as.alice, a.as.carol]);
  const beforeChats = await Promise.all(USERS.map(async (u) => (await allChats(a.as[u])).map(chatView)));

  const problems: string[] = [];
  for (const t of [b, c]) {
    for (const u of USERS) {
      for (const client of [t.as[u], t.asGrpc[u]]) {
        const attempts: Record<string, () => Promise<unknown>> = {
          AddMembers: () => client.members.addMembers({ chatId: victim.general, userIds: ["mallory", u] }),
          "RemoveMember(bob)": () => client.members.removeMember({ chatId: victim.general, userId: "bob" }),
          "RemoveMember(alice)": () => client.members.removeMember({ chatId: victim.general, userId: "alice" }),
          "RemoveMember(self)": () => client.members.removeMember({ chatId: victim.general, userId: u }),
          SendMessage: () => client.messages.sendMessage({ chatId: victim.general, text: `from ${t.id}/${u}` }),
          "SendMessage(client_message_id m-1)": () => client.messages.sendMessage({ chatId: victim.general, text: "hello", clientMessageId: "m-1" }),
          "SendMessage(client_message_id new)": () => client.messages.sendMessage({ chatId: victim.general, text: "x", clientMessageId: `new-${u}` }),
          MarkRead: () => client.chats.markRead({ chatId: victim.general, sequence: 2n }),
          "MarkRead(random)": () => client.chats.markRead({ chatId: victim.random, sequence: 100n }),
          "AddMembers(random)": () => client.members.addMembers({ chatId: victim.random, userIds: [u] }),
        };
        for (const [name, attempt] of Object.entries(attempts)) {
          const o = await outcome(attempt());
          if (o.code !== "NotFound") problems.push(`${t.id}/${u} ${name}: ${o.code} ${o.message}`);
        }
      }
    }
  }
  assert.equal(problems, []);

  assert.equal(await snapshot(victim.general, viewers), before, "tenant A's general chat is unchanged");
  assert.equal(await snapshot(victim.random, [a.as.alice, a.as.carol]), beforeRandom, "tenant A's random chat is unchanged");
  assert.equal(await Promise.all(USERS.map(async (u) => (await allChats(a.as[u])).map(chatView))), beforeChats, "tenant A's chat lists are unchanged");
  assert.equal(await allChats(a.as.dave), [], "nobody was added in tenant A");
  // And the attackers did not gain the chat in their own tenant either.
  for (const t of [b, c]) {
    for (const u of USERS) {
      const ids = (await allChats(t.as[u])).map((ch) => ch.id);
      assert.not.ok(ids.includes(victim.general) || ids.includes(victim.random), `${t.id}/${u} sees tenant A's chat`);
    }
  }
});

test("tenancy - the tenant comes only from the token, never from a header", async () => {
  const [a, b] = tenants as [Tenant, Tenant];
  const sa = scenes.get(a.id)!;
  const sb = scenes.get(b.id)!;
  const tokenB = await tokenFor(b.id, "alice");
  for (const header of ["x-tenant-id", "x-tenant", "tenant", "tid", "x-parley-tenant", "x-tid"]) {
    const list = await fetch(`${server.url}/parley.v1.ChatService/ListChats`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${tokenB}`, [header]: a.id },
      body: "{}",
    });
    assert.is(list.status, 200, header);
    const ids = (((await list.json()) as { chats?: { id: string }[] }).chats ?? []).map((c: { id: string }) => c.id).sort();
    assert.equal(ids, [sb.general, sb.random].sort(), `${header}: tenant B's alice sees B's chats only`);
    const get = await fetch(`${server.url}/parley.v1.ChatService/GetChat`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${tokenB}`, [header]: a.id },
      body: JSON.stringify({ chatId: sa.general }),
    });
    assert.is(get.status, 404, `${header}: tenant A's chat stays NOT_FOUND`);
    await get.body?.cancel();
  }
});

test("tenancy - a page token from another tenant is INVALID_ARGUMENT", async () => {
  const [a, b] = tenants as [Tenant, Tenant];
  // Same user, same request shape in both tenants: alice has two chats ("general", "random") and the
  // general chats have two messages and two members.
  const sa = scenes.get(a.id)!;
  const sb = scenes.get(b.id)!;

  const chatsA = await a.as.alice.chats.listChats({ pageSize: 1 });
  assert.ok(chatsA.nextPageToken, "tenant A's ListChats has a second page");
  const chatsB = await b.as.alice.chats.listChats({ pageSize: 1 });
  assert.ok(chatsB.nextPageToken, "tenant B's ListChats has a second page");
  // Control: each token works for its own tenant.
  assert.is((await a.as.alice.chats.listChats({ pageSize: 1, pageToken: chatsA.nextPageToken })).chats.length, 1);

  const membersA = await a.as.alice.members.listMembers({ chatId: sa.general, pageSize: 1 });
  assert.ok(membersA.nextPageToken);
  const messagesA = await a.as.alice.messages.listMessages({ chatId: sa.general, pageSize: 1 });
  assert.ok(messagesA.nextPageToken);
  const oldestA = await a.as.alice.messages.listMessages({ chatId: sa.general, pageSize: 1, order: Order.OLDEST_FIRST });
  assert.ok(oldestA.nextPageToken);

  const results: Record<string, Outcome> = {};
  for (const [protocolName, alice] of [["connect", b.as.alice], ["grpc", b.asGrpc.alice]] as const) {
    results[`${protocolName} ListChats`] = await outcome(alice.chats.listChats({ pageSize: 1, pageToken: chatsA.nextPageToken }));
    results[`${protocolName} ListMembers`] = await outcome(alice.members.listMembers({ chatId: sb.general, pageSize: 1, pageToken: membersA.nextPageToken }));
    results[`${protocolName} ListMessages`] = await outcome(alice.messages.listMessages({ chatId: sb.general, pageSize: 1, pageToken: messagesA.nextPageToken }));
    results[`${protocolName} ListMessages oldest first`] = await outcome(
      alice.messages.listMessages({ chatId: sb.general, pageSize: 1, pageToken: oldestA.nextPageToken, order: Order.OLDEST_FIRST }),
    );
  }
  const codes = Object.fromEntries(Object.entries(results).map(([k, v]) => [k, v.code]));
  assert.equal(codes, Object.fromEntries(Object.keys(results).map((k) => [k, "InvalidArgument"])), JSON.stringify(results));
});

test("tenancy - notifications of one tenant never reach another tenant's streams", async () => {
  const streams = tenants.map((t) => ({ t, seen: [] as string[], ready: false }));
  const controller = new AbortController();
  const consumers = streams.map(async (s) => {
    try {
      for await (const n of s.t.as.bob.notifications.subscribe({ includeMessages: true }, { signal: controller.signal })) {
        if (n.event.case === "ready") s.ready = true;
        else if (n.event.case !== "heartbeat") s.seen.push(n.chatId || (n.event.value as { chatId?: string })?.chatId || "");
      }
    } catch (error) {
      if (!controller.signal.aborted) throw error;
    }
  });
  try {
    const deadline = Date.now() + 10_000;
    while (!streams.every((s) => s.ready) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    assert.ok(streams.every((s) => s.ready), "every stream got Ready");
    // The same actions in every tenant, by the same user ids.
    const made = new Map<string, string[]>();
    for (const t of tenants) {
      const chat = (await t.as.alice.chats.createChat({ name: "notify", memberIds: ["bob"] })).chat!.id;
      await t.as.alice.messages.sendMessage({ chatId: chat, text: "ping", clientMessageId: "n-1" });
      await t.as.alice.members.addMembers({ chatId: chat, userIds: ["carol"] });
      made.set(t.id, [chat, scenes.get(t.id)!.general]);
      await t.as.alice.messages.sendMessage({ chatId: scenes.get(t.id)!.general, text: "ping general" });
    }
    // Each stream gets its own tenant's events (at least the message in the new chat) ...
    const until = Date.now() + 10_000;
    while (Date.now() < until && !streams.every((s) => s.seen.filter((c) => made.get(s.t.id)!.includes(c)).length >= 4)) {
      await new Promise((r) => setTimeout(r, 20));
    }
    await new Promise((r) => setTimeout(r, 300)); // room for stray events to arrive
    for (const s of streams) {
      const mine = made.get(s.t.id)!;
      assert.ok(s.seen.filter((c) => mine.includes(c)).length >= 4, `${s.t.id}: own events arrived: ${JSON.stringify(s.seen)}`);
      // ... and nothing else.
      assert.equal(s.seen.filter((c) => !mine.includes(c)), [], `${s.t.id}: foreign events`);
    }
  } finally {
    controller.abort();
    await Promise.allSettled(consumers);
  }
});

// ---------------------------------------------------------------------------------------------
// Seeded randomized mix of both tenants' operations, checked against a model.

function mulberry32(seed: number) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

interface MMessage { id: string; sender: string; text: string; seq: number; cmid: string }
interface MChat {
  id: string;
  name: string;
  creator: string;
  /** In join order; `batch` groups users who joined in the same request (their relative order is not defined). */
  members: { user: string; batch: number; addedBy: string | undefined }[];
  messages: MMessage[];
  /** Known read_sequence per member; undefined when not known (a member added later: its starting point is not specified). */
  reads: Map<string, number | undefined>;
  /** Lower bound per member when the exact value is unknown. */
  readFloor: Map<string, number>;
  cmids: Map<string, MMessage>;
}
interface MTenant { t: Tenant; chats: MChat[] }

test("tenancy - seeded random mix of three tenants' operations leaves each tenant exactly its own data", async () => {
  const seed = Number(process.env.TENANCY_SEED ?? 20240611);
  const models: MTenant[] = [];
  for (const label of ["ra", "rb", "rc"]) models.push({ t: await makeTenant(label), chats: [] });
  // One generator per tenant, so the run does not depend on how the concurrent requests interleave.
  const generators = models.map((_, i) => mulberry32(seed * 31 + i));
  const problems: string[] = [];
  let batch = 0;
  let textCounter = 0;

  const tally: Record<string, number> = {};
  const expectCode = (where: string, got: Outcome, want: Outcome["code"]) => {
    const kind = where.replace(/^.*? \S+\/\S+ /, "").replace(/\(.*?\)| on \S+/g, "").trim();
    tally[`${kind} → ${want}`] = (tally[`${kind} → ${want}`] ?? 0) + 1;
    if (got.code !== want) problems.push(`${where}: expected ${want}, got ${got.code} ${got.message}`);
  };
  const isMember = (c: MChat, u: string) => c.members.some((m) => m.user === u);
  const last = (c: MChat) => c.messages.length;
  const checkRead = (where: string, c: MChat, u: string, chat: Chat | undefined) => {
    if (!chat) return problems.push(`${where}: no chat in the response`);
    const read = Number(chat.readSequence);
    if (Number(chat.lastSequence) !== last(c)) problems.push(`${where}: last_sequence ${chat.lastSequence}, model ${last(c)}`);
    if (Number(chat.unreadCount) !== last(c) - read) problems.push(`${where}: unread_count ${chat.unreadCount} != ${last(c)} - ${read}`);
    const known = c.reads.get(u);
    if (known !== undefined) {
      if (read !== known) problems.push(`${where}: read_sequence ${read}, model ${known}`);
    } else {
      const floor = c.readFloor.get(u) ?? 0;
      if (read < floor || read > last(c)) problems.push(`${where}: read_sequence ${read} outside [${floor}, ${last(c)}]`);
      else c.reads.set(u, read); // from now on it is known
    }
  };
  const raiseRead = (c: MChat, u: string, to: number) => {
    const known = c.reads.get(u);
    if (known !== undefined) c.reads.set(u, Math.max(known, to));
    else c.readFloor.set(u, Math.max(c.readFloor.get(u) ?? 0, to));
  };

  /** One operation of tenant `m`; `foreign` is the other tenants' chats as they were when the round began. */
  async function step(m: MTenant, random: () => number, n: number, foreign: { id: string; messageIds: string[] }[]): Promise<void> {
    const int = (k: number) => Math.floor(random() * k);
    const choose = <T,>(items: readonly T[]) => items[int(items.length)]!;
    const t = m.t;
    const r = random();
    const useGrpc = random() < 0.5;
    // Mostly a member of the chat the operation is about, sometimes anybody.
    const chat = m.chats.length ? choose(m.chats) : undefined;
    const anybody = choose(USERS);
    const caller = chat && chat.members.length && random() < 0.7 ? (choose(chat.members).user as User) : anybody;
    const client = useGrpc ? t.asGrpc[caller] : t.as[caller];
    const where = `seed ${seed} round ${n} ${t.id}/${caller}`;

    if (!chat || r < 0.08) {
      const name = choose(["general", "random", "ops"]);
      const memberIds = USERS.filter(() => random() < 0.4);
      if (random() < 0.3) memberIds.push(choose(USERS)); // duplicates are ignored
      let chat: Chat | undefined;
      const o = await outcome(client.chats.createChat({ name, memberIds }).then((x) => (chat = x.chat)));
      expectCode(`${where} CreateChat`, o, "ok");
      if (!chat) return;
      batch++;
      const users = [...new Set([caller, ...memberIds])];
      m.chats.push({
        id: chat.id,
        name,
        creator: caller,
        members: users.map((u) => ({ user: u, batch, addedBy: undefined })),
        messages: [],
        reads: new Map(users.map((u) => [u, 0])),
        readFloor: new Map(),
        cmids: new Map(),
      });
      if (chat.name !== name || chat.creatorId !== caller || chat.memberCount !== users.length || chat.lastSequence !== 0n) {
        problems.push(`${where} CreateChat: ${JSON.stringify(chatView(chat))}, expected ${users.length} members`);
      }
      return;
    }

    const member = isMember(chat, caller);
    if (r < 0.22) {
      // Another tenant's real ids.
      if (foreign.length === 0) return;
      const target = choose(foreign);
      const messageId = target.messageIds.length ? choose(target.messageIds) : lookalike(target.id);
      const attempts = probes(client, target.id, messageId, chat.id);
      const name = choose(Object.keys(attempts).filter((k) => k !== "GetMessage(own chat, foreign message)" || member));
      expectCode(`${where} cross-tenant ${name} on ${target.id}`, await outcome(attempts[name]!()), "NotFound");
      return;
    }
    if (r < 0.5) {
      const cmid = random() < 0.4 ? choose(["c1", "c2", "c3"]) : "";
      const text = cmid ? `text of ${caller} ${cmid} in ${chat.name}` : `text ${++textCounter} of ${caller}`;
      let message: Message | undefined;
      const o = await outcome(client.messages.sendMessage({ chatId: chat.id, text, clientMessageId: cmid }).then((x) => (message = x.message)));
      if (!member) return expectCode(`${where} SendMessage as non-member`, o, "NotFound");
      expectCode(`${where} SendMessage`, o, "ok");
      if (!message) return;
      const original = cmid ? chat.cmids.get(`${caller}\u0000${cmid}`) : undefined;
      const expected: MMessage = original ?? { id: message.id, sender: caller, text, seq: last(chat) + 1, cmid };
      const got = { id: message.id, sender: message.senderId, text: message.text, seq: Number(message.sequence), cmid: message.clientMessageId };
      if (JSON.stringify(got) !== JSON.stringify(expected) || message.chatId !== chat.id) {
        problems.push(`${where} SendMessage${original ? " retry" : ""}: got ${JSON.stringify(got)}, expected ${JSON.stringify(expected)}`);
      }
      if (!original) {
        chat.messages.push(expected);
        if (cmid) chat.cmids.set(`${caller}\u0000${cmid}`, expected);
        raiseRead(chat, caller, expected.seq);
      }
      return;
    }
    if (r < 0.62) {
      const userIds = USERS.filter(() => random() < 0.35) as string[];
      if (userIds.length === 0) userIds.push(choose(USERS));
      if (random() < 0.3) userIds.push(userIds[0]!);
      let added: Member[] | undefined;
      const o = await outcome(client.members.addMembers({ chatId: chat.id, userIds }).then((x) => (added = x.added)));
      if (!member) return expectCode(`${where} AddMembers as non-member`, o, "NotFound");
      expectCode(`${where} AddMembers`, o, "ok");
      if (!added) return;
      const expectedAdded = [...new Set(userIds)].filter((u) => !isMember(chat, u));
      const got = added.map((a) => `${a.userId}/${a.addedBy}`).sort();
      const want = expectedAdded.map((u) => `${u}/${caller}`).sort();
      if (JSON.stringify(got) !== JSON.stringify(want)) problems.push(`${where} AddMembers ${JSON.stringify(userIds)}: added ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
      batch++;
      for (const u of expectedAdded) {
        chat.members.push({ user: u, batch, addedBy: caller });
        chat.reads.set(u, undefined);
        chat.readFloor.set(u, 0);
      }
      return;
    }
    if (r < 0.72) {
      const target = random() < 0.4 ? caller : choose(USERS);
      const o = await outcome(client.members.removeMember({ chatId: chat.id, userId: target }));
      if (!member) return expectCode(`${where} RemoveMember(${target}) as non-member`, o, "NotFound");
      if (!isMember(chat, target)) return expectCode(`${where} RemoveMember(${target}) of a non-member`, o, "NotFound");
      expectCode(`${where} RemoveMember(${target})`, o, "ok");
      if (o.code === "ok") {
        chat.members = chat.members.filter((x) => x.user !== target);
        chat.reads.delete(target);
        chat.readFloor.delete(target);
      }
      return;
    }
    if (r < 0.82) {
      const sequence = int(last(chat) + 3);
      let result: Chat | undefined;
      const o = await outcome(client.chats.markRead({ chatId: chat.id, sequence: BigInt(sequence) }).then((x) => (result = x.chat)));
      if (!member) return expectCode(`${where} MarkRead as non-member`, o, "NotFound");
      expectCode(`${where} MarkRead`, o, "ok");
      if (o.code !== "ok") return;
      raiseRead(chat, caller, Math.min(sequence, last(chat)));
      checkRead(`${where} MarkRead(${sequence})`, chat, caller, result);
      return;
    }
    if (r < 0.92) {
      let result: Chat | undefined;
      const o = await outcome(client.chats.getChat({ chatId: chat.id }).then((x) => (result = x.chat)));
      if (!member) return expectCode(`${where} GetChat as non-member`, o, "NotFound");
      expectCode(`${where} GetChat`, o, "ok");
      if (!result) return;
      const want = { id: chat.id, name: chat.name, creatorId: chat.creator, memberCount: chat.members.length };
      const got = { id: result.id, name: result.name, creatorId: result.creatorId, memberCount: result.memberCount };
      if (JSON.stringify(got) !== JSON.stringify(want)) problems.push(`${where} GetChat: ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
      checkRead(`${where} GetChat`, chat, caller, result);
      return;
    }
    // GetMessage of an own-tenant message, or of a well-formed id nobody has.
    const target = chat.messages.length && random() < 0.8 ? choose(chat.messages) : undefined;
    const messageId = target?.id ?? lookalike(chat.messages[0]?.id ?? chat.id);
    let result: Message | undefined;
    const o = await outcome(client.messages.getMessage({ chatId: chat.id, messageId }).then((x) => (result = x.message)));
    if (!member || !target) return expectCode(`${where} GetMessage (member ${member}, exists ${!!target})`, o, "NotFound");
    expectCode(`${where} GetMessage`, o, "ok");
    if (result && (result.id !== target.id || Number(result.sequence) !== target.seq || result.text !== target.text || result.senderId !== target.sender)) {
      problems.push(`${where} GetMessage: ${JSON.stringify(messageView(result))}, expected ${JSON.stringify(target)}`);
    }
  }

  // 100 rounds of one operation per tenant, the three tenants' requests running concurrently: 300 operations.
  for (let n = 0; n < 100; n++) {
    const pools = models.map((m) => m.chats.map((c) => ({ id: c.id, messageIds: c.messages.map((x) => x.id) })));
    await Promise.all(models.map((m, i) => step(m, generators[i]!, n, pools.filter((_, j) => j !== i).flat())));
  }
  assert.equal(problems.slice(0, 20), [], `${problems.length} problems during the run`);
  if (process.env.TENANCY_VERBOSE) console.log(tally);
  // The run really mixed successes, refusals and cross-tenant attempts.
  const total = (prefix: string) => Object.entries(tally).filter(([k]) => k.startsWith(prefix)).reduce((sum, [, v]) => sum + v, 0);
  for (const kind of ["SendMessage → ok", "SendMessage as non-member → NotFound", "AddMembers → ok", "RemoveMember → ok", "MarkRead → ok", "GetChat → ok", "cross-tenant"]) {
    assert.ok(total(kind) > 0, `the run never did ${kind}: ${JSON.stringify(tally)}`);
  }

  // Final check: each tenant's data is exactly what its own operations made.
  for (const m of models) {
    for (const u of USERS) {
      const where = `seed ${seed} final ${m.t.id}/${u}`;
      const listed = await allChats(m.t.as[u], 3);
      const want = m.chats.filter((c) => isMember(c, u)).map((c) => c.id).sort();
      assert.equal(listed.map((c) => c.id).sort(), want, `${where}: ListChats`);
      // Most recent activity first.
      const activity = listed.map((c) => {
        const t = c.lastMessageTime ?? c.createTime;
        return Number(t?.seconds ?? 0n) * 1e9 + (t?.nanos ?? 0);
      });
      for (let i = 1; i < activity.length; i++) {
        assert.ok(activity[i - 1]! >= activity[i]!, `${where}: ListChats not ordered by recent activity: ${activity}`);
      }
      for (const c of m.chats) {
        const o = await outcome(m.t.as[u].chats.getChat({ chatId: c.id }));
        if (!isMember(c, u)) assert.is(o.code, "NotFound", `${where}: GetChat of a chat it is not in`);
      }
      for (const chat of listed) {
        const c = m.chats.find((x) => x.id === chat.id)!;
        assert.equal(
          { name: chat.name, creatorId: chat.creatorId, memberCount: chat.memberCount, lastSequence: Number(chat.lastSequence) },
          { name: c.name, creatorId: c.creator, memberCount: c.members.length, lastSequence: last(c) },
          `${where}: chat ${c.id}`,
        );
        checkRead(`${where}: chat ${c.id}`, c, u, chat);
      }
    }
    for (const c of m.chats) {
      const viewer = c.members[0]?.user as User | undefined;
      if (!viewer) continue; // nobody left who could look
      const where = `seed ${seed} final ${m.t.id} chat ${c.id}`;
      const members = await allMembers(m.t.asGrpc[viewer], c.id, 2);
      assert.equal(members.map((x) => x.userId).sort(), c.members.map((x) => x.user).sort(), `${where}: members`);
      const batches = members.map((x) => c.members.find((y) => y.user === x.userId)!.batch);
      assert.equal(batches, [...batches].sort((p, q) => p - q), `${where}: ListMembers in join order`);
      for (const x of members) {
        const want = c.members.find((y) => y.user === x.userId)!.addedBy;
        if (want !== undefined) assert.is(x.addedBy, want, `${where}: added_by of ${x.userId}`);
      }
      const messages = await allMessages(m.t.as[viewer], c.id, 7);
      assert.equal(
        messages.map((x) => ({ id: x.id, sender: x.senderId, text: x.text, seq: Number(x.sequence), cmid: x.clientMessageId })),
        c.messages,
        `${where}: messages`,
      );
      const newest = await allMessages(m.t.as[viewer], c.id, 5, Order.UNSPECIFIED);
      assert.equal(newest.map((x) => x.id), c.messages.map((x) => x.id).reverse(), `${where}: newest first by default`);
    }
  }
  assert.equal(problems.slice(0, 20), [], `${problems.length} problems in the final check`);
});

test.run();

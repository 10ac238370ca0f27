// The public unary API (ChatService, MemberService, MessageService) checked against /work/shared/api.md
// with @grpc/grpc-js, the independent gRPC client (stubs loaded from the .proto files).
import crypto from "node:crypto";
import { fromBinary } from "@bufbuild/protobuf";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import * as grpc from "@grpc/grpc-js";
import { SignJWT } from "jose";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { BadRequestSchema, RetryInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import { grpcMetadata, grpcPackage, grpcUnary } from "./support/clients.js";
import { startTestServer, TEST_SECRET, tokenFor, uniqueTenant, type TestServer } from "./support/server.js";

// ---------------------------------------------------------------------------------------------------
// Harness

const pkg = grpcPackage();

interface Stubs {
  chats: grpc.Client;
  members: grpc.Client;
  messages: grpc.Client;
  close(): void;
}

function connect(server: TestServer): Stubs {
  const creds = grpc.credentials.createInsecure();
  const chats = new pkg.parley.v1.ChatService!(server.address, creds);
  const members = new pkg.parley.v1.MemberService!(server.address, creds);
  const messages = new pkg.parley.v1.MessageService!(server.address, creds);
  return {
    chats,
    members,
    messages,
    close() {
      chats.close();
      members.close();
      messages.close();
    },
  };
}

/** main: high send rate (big chats, concurrency, durability). limits: tiny rate limit and member cap. */
let main: TestServer;
let mainStubs: Stubs;
let limits: TestServer;
let limitStubs: Stubs;

test.before(async () => {
  // One after the other: two embedded databases booting at once in one process can starve each other.
  // A generous database timeout keeps a loaded CI machine from failing the start.
  const settle = <T>(p: Promise<T>) => p.then(
    (value): PromiseSettledResult<T> => ({ status: "fulfilled", value }),
    (reason): PromiseSettledResult<T> => ({ status: "rejected", reason }),
  );
  const started = [
    await settle(startTestServer({ PARLEY_SEND_RATE: "100000", PARLEY_SEND_BURST: "100000", PARLEY_DB_TIMEOUT_SECONDS: "30" })),
  ];
  if (started[0]!.status === "fulfilled") {
    started.push(
      await settle(
        startTestServer({ PARLEY_SEND_RATE: "1", PARLEY_SEND_BURST: "3", PARLEY_MAX_MEMBERS: "3", PARLEY_DB_TIMEOUT_SECONDS: "30" }),
      ),
    );
  }
  const failed = started.find((r) => r.status === "rejected");
  if (failed) {
    // uvu reports a failing hook only as "0 passed": say why, and leave nothing running.
    console.error("api-grpc: could not start the test servers:", failed.reason);
    await Promise.all(started.map((r) => (r.status === "fulfilled" ? r.value.destroy() : undefined)));
    throw failed.reason;
  }
  [main, limits] = started.map((r) => (r as PromiseFulfilledResult<TestServer>).value) as [TestServer, TestServer];
  mainStubs = connect(main);
  limitStubs = connect(limits);
});

test.after(async () => {
  mainStubs?.close();
  limitStubs?.close();
  await Promise.all([main?.destroy(), limits?.destroy()]);
});

const RPCS = {
  CreateChat: "chats",
  ListChats: "chats",
  GetChat: "chats",
  MarkRead: "chats",
  ListMembers: "members",
  AddMembers: "members",
  RemoveMember: "members",
  SendMessage: "messages",
  ListMessages: "messages",
  GetMessage: "messages",
} as const;
type Rpc = keyof typeof RPCS;

/** Calls an RPC with raw metadata (or none). */
function rawCall(stubs: Stubs, rpc: Rpc, request: object, metadata: grpc.Metadata = new grpc.Metadata()): Promise<any> {
  return grpcUnary(stubs[RPCS[rpc]], rpc, request, metadata, { deadline: Date.now() + 30_000 });
}

interface User {
  name: string;
  tenant: string;
  call(rpc: Rpc, request: object): Promise<any>;
  createChat(name: string, memberIds?: string[]): Promise<any>;
  send(chatId: string, text: string, clientMessageId?: string): Promise<any>;
  getChat(chatId: string): Promise<any>;
}

/** A user of a tenant, calling the main server (or the limits server); follows restarts of main. */
async function userOf(tenant: string, name: string, stubs: () => Stubs = () => mainStubs): Promise<User> {
  const token = await tokenFor(tenant, name);
  const call = (rpc: Rpc, request: object) => rawCall(stubs(), rpc, request, grpcMetadata(token));
  return {
    name,
    tenant,
    call,
    createChat: async (chatName, memberIds = []) => (await call("CreateChat", { name: chatName, memberIds })).chat,
    send: async (chatId, text, clientMessageId = "") =>
      (await call("SendMessage", { chatId, text, clientMessageId })).message,
    getChat: async (chatId) => (await call("GetChat", { chatId })).chat,
  };
}

async function users<N extends string[]>(tenant: string, ...names: N): Promise<{ [K in keyof N]: User }> {
  return (await Promise.all(names.map((n) => userOf(tenant, n)))) as { [K in keyof N]: User };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function tsMillis(ts: { seconds: string | number; nanos: number } | null | undefined): number {
  assert.ok(ts, "timestamp is set");
  return Number(ts!.seconds) * 1000 + Math.floor(ts!.nanos / 1e6);
}

/** A well-formed id that does not exist: a real id with its random tail replaced. */
function unknownIdLike(realId: string): string {
  const hex = crypto.randomBytes(6).toString("hex");
  return realId.slice(0, realId.length - 12) + hex;
}

/** Expects the call to fail with the given code; returns the error. */
async function rejects(promise: Promise<unknown>, code: grpc.status, what = "call"): Promise<grpc.ServiceError> {
  let result: unknown;
  try {
    result = await promise;
  } catch (error) {
    const e = error as grpc.ServiceError;
    assert.is(
      grpc.status[e.code],
      grpc.status[code],
      `${what}: expected ${grpc.status[code]}, got ${grpc.status[e.code]} (${e.details})`,
    );
    return e;
  }
  assert.unreachable(`${what}: expected ${grpc.status[code]}, but it succeeded with ${JSON.stringify(result)}`);
  throw new Error("unreachable");
}

interface AnyDetail {
  typeUrl: string;
  value: Uint8Array;
}

/** Decodes the grpc-status-details-bin trailer as google.rpc.Status and returns its details (Any). */
function statusDetails(error: grpc.ServiceError): AnyDetail[] {
  const raw = error.metadata?.get("grpc-status-details-bin")?.[0];
  if (!raw) return [];
  const bytes = typeof raw === "string" ? Buffer.from(raw, "base64") : new Uint8Array(raw);
  const reader = new BinaryReader(bytes);
  const details: AnyDetail[] = [];
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if (field === 3 && wireType === WireType.LengthDelimited) {
      const any = new BinaryReader(reader.bytes());
      const detail: AnyDetail = { typeUrl: "", value: new Uint8Array() };
      while (any.pos < any.len) {
        const [f, w] = any.tag();
        if (f === 1) detail.typeUrl = any.string();
        else if (f === 2) detail.value = any.bytes();
        else any.skip(w);
      }
      details.push(detail);
    } else {
      reader.skip(wireType);
    }
  }
  return details;
}

function badRequestFields(error: grpc.ServiceError): string[] {
  const detail = statusDetails(error).find((d) => d.typeUrl.endsWith("/google.rpc.BadRequest"));
  assert.ok(detail, `INVALID_ARGUMENT (${error.details}) carries a google.rpc.BadRequest detail`);
  return fromBinary(BadRequestSchema, detail!.value).fieldViolations.map((v) => v.field);
}

const normalize = (field: string) => field.replace(/_/g, "").toLowerCase();

/** Expects INVALID_ARGUMENT with a BadRequest violation naming one of the fields (snake_case per AIP; camelCase tolerated). */
async function invalid(promise: Promise<unknown>, fields: string | string[], what = "call"): Promise<grpc.ServiceError> {
  const error = await rejects(promise, grpc.status.INVALID_ARGUMENT, what);
  const got = badRequestFields(error);
  const wanted = (Array.isArray(fields) ? fields : [fields]).map(normalize);
  const names = got.some((f) => {
    const n = normalize(f);
    return wanted.some((w) => n === w || n.startsWith(`${w}[`) || n.startsWith(`${w}.`));
  });
  assert.ok(names, `${what}: BadRequest names ${JSON.stringify(fields)}, got ${JSON.stringify(got)}`);
  return error;
}

/** Pages through a list RPC; returns the items of each page. */
async function pages(user: User, rpc: Rpc, request: object, key: string, max = 100): Promise<any[][]> {
  const result: any[][] = [];
  let pageToken = "";
  for (let i = 0; i < max; i++) {
    const response = await user.call(rpc, { ...request, pageToken });
    result.push(response[key]);
    pageToken = response.nextPageToken;
    if (!pageToken) return result;
    assert.ok(response[key].length > 0, `${rpc}: a non-last page is not empty`);
  }
  assert.unreachable(`${rpc}: more than ${max} pages`);
  return result;
}

async function allMessages(user: User, chatId: string, request: object = {}): Promise<any[]> {
  return (await pages(user, "ListMessages", { chatId, pageSize: 200, ...request }, "messages")).flat();
}

async function memberIds(user: User, chatId: string): Promise<string[]> {
  return (await pages(user, "ListMembers", { chatId, pageSize: 200 }, "members")).flat().map((m) => m.userId);
}

async function sendMany(user: User, chatId: string, n: number, prefix = "m"): Promise<any[]> {
  const out: any[] = [];
  for (let i = 1; i <= n; i++) out.push(await user.send(chatId, `${prefix}${i}`));
  return out;
}

const seqs = (messages: any[]) => messages.map((m) => Number(m.sequence));
const range = (from: number, to: number) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

// ---------------------------------------------------------------------------------------------------
// Authentication

test("auth - every unary RPC without a token is UNAUTHENTICATED", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const chat = await alice.createChat("c", ["bob"]);
  const msg = await alice.send(chat.id, "hello");
  const requests: Record<Rpc, object> = {
    CreateChat: { name: "x", memberIds: [] },
    ListChats: {},
    GetChat: { chatId: chat.id },
    MarkRead: { chatId: chat.id, sequence: 1 },
    ListMembers: { chatId: chat.id },
    AddMembers: { chatId: chat.id, userIds: ["carol"] },
    RemoveMember: { chatId: chat.id, userId: "bob" },
    SendMessage: { chatId: chat.id, text: "no token" },
    ListMessages: { chatId: chat.id },
    GetMessage: { chatId: chat.id, messageId: msg.id },
  };
  for (const [rpc, request] of Object.entries(requests) as [Rpc, object][]) {
    await rejects(rawCall(mainStubs, rpc, request), grpc.status.UNAUTHENTICATED, `${rpc} without token`);
  }
  // Nothing happened: still 2 members, 1 message.
  const after = await alice.getChat(chat.id);
  assert.is(after.memberCount, 2);
  assert.is(after.lastSequence, "1");
});

test("auth - bad tokens (wrong secret, expired, no tenant, not a JWT) are UNAUTHENTICATED", async () => {
  const tenant = uniqueTenant();
  const bad = [
    ["wrong secret", await tokenFor(tenant, "alice", {}, `${TEST_SECRET}-other`)],
    [
      "expired",
      await new SignJWT({ tid: tenant })
        .setProtectedHeader({ alg: "HS256" })
        .setSubject("alice")
        .setIssuedAt(Math.floor(Date.now() / 1000) - 7200)
        .setExpirationTime(Math.floor(Date.now() / 1000) - 3600)
        .sign(new TextEncoder().encode(TEST_SECRET)),
    ],
    ["no tid", await tokenFor(tenant, "alice", { tid: undefined })],
    ["bad tid", await tokenFor(tenant, "alice", { tid: "bad tenant!" })],
    ["sub of 129 characters", await tokenFor(tenant, "u".repeat(129))],
    ["control character in sub", await tokenFor(tenant, "al\u0001ice")],
    ["tid of 64 characters", await tokenFor("t".repeat(64), "alice")],
    ["tid starting with '-'", await tokenFor("-tenant", "alice")],
    ["garbage", "not.a.jwt"],
  ];
  for (const [label, token] of bad) {
    await rejects(rawCall(mainStubs, "ListChats", {}, grpcMetadata(token!)), grpc.status.UNAUTHENTICATED, `ListChats with ${label} token`);
    await rejects(
      rawCall(mainStubs, "CreateChat", { name: "x" }, grpcMetadata(token!)),
      grpc.status.UNAUTHENTICATED,
      `CreateChat with ${label} token`,
    );
  }
});

// ---------------------------------------------------------------------------------------------------
// ChatService

test("CreateChat - caller is always a member, duplicate member_ids ignored, fields set", async () => {
  const tenant = uniqueTenant();
  const [alice, bob, carol] = await users(tenant, "alice", "bob", "carol");
  const before = Date.now();
  const chat = await alice.createChat("Team", ["bob", "bob", "carol", "alice", "carol"]);
  const after = Date.now();
  assert.type(chat.id, "string");
  assert.ok(chat.id.length > 0, "chat id set");
  assert.is(chat.name, "Team");
  assert.is(chat.memberCount, 3);
  assert.is(chat.creatorId, "alice");
  assert.is(chat.lastSequence, "0");
  assert.is(chat.lastMessageTime, null, "last_message_time unset without messages");
  assert.is(chat.readSequence, "0");
  assert.is(chat.unreadCount, "0");
  const created = tsMillis(chat.createTime);
  assert.ok(created >= before - 2000 && created <= after + 2000, `create_time ${created} within [${before}, ${after}]`);

  const { members } = await alice.call("ListMembers", { chatId: chat.id });
  assert.equal(members.map((m: any) => m.userId).sort(), ["alice", "bob", "carol"]);
  for (const m of members) {
    assert.is(m.addedBy, "alice", `added_by of initial member ${m.userId} is the creator`);
    assert.ok(m.joinTime, "join_time set");
  }
  // Every initial member sees the same chat.
  for (const u of [bob, carol]) {
    const seen = await u.getChat(chat.id);
    assert.is(seen.id, chat.id);
    assert.is(seen.creatorId, "alice");
    assert.is(seen.memberCount, 3);
  }
});

test("CreateChat - caller alone, empty name and a 200-character name are fine", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const solo = await alice.createChat("");
  assert.is(solo.memberCount, 1);
  assert.is(solo.name, "");
  assert.equal(await memberIds(alice, solo.id), ["alice"]);
  const name200 = "é".repeat(200);
  const long = await alice.createChat(name200);
  assert.is(long.name, name200);
  assert.is((await alice.getChat(long.id)).name, name200);
});

test("CreateChat - names and texts are stored verbatim (unicode, whitespace)", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const name = "  Ünïcødé 🎉 chat\twith\nlines  ";
  const chat = await alice.createChat(name);
  assert.is((await alice.getChat(chat.id)).name, name);
  const text = "  hello 👋🏽\n second line\t ";
  const sent = await alice.send(chat.id, text);
  assert.is(sent.text, text);
  assert.is((await alice.call("GetMessage", { chatId: chat.id, messageId: sent.id })).message.text, text);
});

test("ListChats - only the caller's chats, most recent activity first; a new message moves a chat to the top", async () => {
  const tenant = uniqueTenant();
  const [alice, bob, carol, dave] = await users(tenant, "alice", "bob", "carol", "dave");
  const c1 = await alice.createChat("c1", ["bob"]);
  await sleep(15);
  const c2 = await alice.createChat("c2", ["carol"]);
  await sleep(15);
  const c3 = await alice.createChat("c3");
  const ids = async (u: User) => (await u.call("ListChats", {})).chats.map((c: any) => c.name);
  assert.equal(await ids(alice), ["c3", "c2", "c1"]);
  assert.equal(await ids(bob), ["c1"]);
  assert.equal(await ids(carol), ["c2"]);
  assert.equal(await ids(dave), []);

  await sleep(15);
  await bob.send(c1.id, "bump");
  assert.equal(await ids(alice), ["c1", "c3", "c2"]);
  const listed = (await alice.call("ListChats", {})).chats[0];
  assert.is(listed.id, c1.id);
  assert.is(listed.lastSequence, "1");
  assert.is(listed.unreadCount, "1");
  assert.is(listed.readSequence, "0");
  assert.ok(listed.lastMessageTime, "last_message_time set");

  await sleep(15);
  await carol.send(c2.id, "bump");
  assert.equal(await ids(alice), ["c2", "c1", "c3"]);

  // Same user name in another tenant sees nothing of it.
  const [otherAlice] = await users(uniqueTenant(), "alice");
  assert.equal((await otherAlice.call("ListChats", {})).chats, []);
  void c3;
});

test("GetChat - returns the chat as created; non-members and other tenants get NOT_FOUND", async () => {
  const tenant = uniqueTenant();
  const [alice, eve] = await users(tenant, "alice", "eve");
  const chat = await alice.createChat("Get me", ["bob"]);
  const got = await alice.getChat(chat.id);
  for (const field of ["id", "name", "memberCount", "creatorId", "lastSequence", "readSequence", "unreadCount"]) {
    assert.equal(got[field], chat[field], `GetChat.${field}`);
  }
  assert.is(tsMillis(got.createTime), tsMillis(chat.createTime));
  await rejects(eve.getChat(chat.id), grpc.status.NOT_FOUND, "GetChat by non-member");
  const [otherAlice] = await users(uniqueTenant(), "alice");
  await rejects(otherAlice.getChat(chat.id), grpc.status.NOT_FOUND, "GetChat from another tenant");
});

test("MarkRead - read_sequence = max(current, min(sequence, last_sequence)), unread = last - read", async () => {
  const [alice, bob] = await users(uniqueTenant(), "alice", "bob");
  const chat = await alice.createChat("reads", ["bob"]);
  await sendMany(bob, chat.id, 5);
  let c = await alice.getChat(chat.id);
  assert.is(c.lastSequence, "5");
  assert.is(c.readSequence, "0");
  assert.is(c.unreadCount, "5");

  const mark = async (sequence: number | string) => (await alice.call("MarkRead", { chatId: chat.id, sequence })).chat;
  c = await mark(3);
  assert.is(c.id, chat.id);
  assert.is(c.readSequence, "3");
  assert.is(c.unreadCount, "2");
  c = await mark(2); // never backwards
  assert.is(c.readSequence, "3");
  assert.is(c.unreadCount, "2");
  c = await mark(0);
  assert.is(c.readSequence, "3");
  c = await mark(100); // never past the last message
  assert.is(c.readSequence, "5");
  assert.is(c.unreadCount, "0");
  c = await alice.getChat(chat.id);
  assert.is(c.readSequence, "5");
  assert.is(c.unreadCount, "0");

  // Read state is per caller.
  c = await bob.getChat(chat.id);
  assert.is(c.readSequence, "5", "the sender has read its own messages");

  await bob.send(chat.id, "6");
  c = await alice.getChat(chat.id);
  assert.is(c.lastSequence, "6");
  assert.is(c.readSequence, "5");
  assert.is(c.unreadCount, "1");
  // A huge sequence (beyond int32) is clamped too.
  c = await mark("9000000000000");
  assert.is(c.readSequence, "6");
  assert.is(c.unreadCount, "0");
});

test("MarkRead - on a chat without messages the read marker stays 0", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const chat = await alice.createChat("empty");
  const c = (await alice.call("MarkRead", { chatId: chat.id, sequence: 10 })).chat;
  assert.is(c.readSequence, "0");
  assert.is(c.unreadCount, "0");
  assert.is(c.lastSequence, "0");
  // A later message is unread for the other member, read for the sender.
  await alice.send(chat.id, "first");
  const again = await alice.getChat(chat.id);
  assert.is(again.readSequence, "1");
  assert.is(again.unreadCount, "0");
});

test("MarkRead - sending a message marks the chat read up to it for the sender", async () => {
  const [alice, bob] = await users(uniqueTenant(), "alice", "bob");
  const chat = await alice.createChat("send-read", ["bob"]);
  await sendMany(bob, chat.id, 4);
  let a = await alice.getChat(chat.id);
  assert.is(a.unreadCount, "4");
  await alice.send(chat.id, "my reply");
  a = await alice.getChat(chat.id);
  assert.is(a.lastSequence, "5");
  assert.is(a.readSequence, "5");
  assert.is(a.unreadCount, "0");
  const b = await bob.getChat(chat.id);
  assert.is(b.readSequence, "4");
  assert.is(b.unreadCount, "1");
  // Also visible in ListChats.
  const listed = (await bob.call("ListChats", {})).chats.find((c: any) => c.id === chat.id);
  assert.is(listed.unreadCount, "1");
  assert.is(listed.readSequence, "4");
});

// ---------------------------------------------------------------------------------------------------
// MemberService

test("ListMembers - join order, added_by and join_time", async () => {
  const [alice, u1] = await users(uniqueTenant(), "alice", "u1");
  const chat = await alice.createChat("order");
  await alice.call("AddMembers", { chatId: chat.id, userIds: ["u1"] });
  await sleep(10);
  await u1.call("AddMembers", { chatId: chat.id, userIds: ["u2"] });
  await sleep(10);
  await alice.call("AddMembers", { chatId: chat.id, userIds: ["u3"] });
  await sleep(10);
  await u1.call("AddMembers", { chatId: chat.id, userIds: ["a-last"] });
  const { members, nextPageToken } = await alice.call("ListMembers", { chatId: chat.id });
  assert.is(nextPageToken, "");
  assert.equal(members.map((m: any) => m.userId), ["alice", "u1", "u2", "u3", "a-last"]);
  assert.equal(members.map((m: any) => m.addedBy), ["alice", "alice", "u1", "alice", "u1"]);
  const times = members.map((m: any) => tsMillis(m.joinTime));
  for (let i = 1; i < times.length; i++) assert.ok(times[i] >= times[i - 1], "join_time non-decreasing in join order");
  assert.is((await alice.getChat(chat.id)).memberCount, 5);
});

test("AddMembers - returns only new members; already-members and duplicates skipped; idempotent", async () => {
  const [alice, bob] = await users(uniqueTenant(), "alice", "bob");
  const chat = await alice.createChat("add", ["bob"]);
  const first = await bob.call("AddMembers", { chatId: chat.id, userIds: ["alice", "bob", "carol", "dan", "dan"] });
  assert.equal(first.added.map((m: any) => m.userId).sort(), ["carol", "dan"]);
  for (const m of first.added) {
    assert.is(m.addedBy, "bob");
    assert.ok(m.joinTime, "join_time set");
  }
  const again = await alice.call("AddMembers", { chatId: chat.id, userIds: ["carol", "dan"] });
  assert.equal(again.added, []);
  const members = await alice.call("ListMembers", { chatId: chat.id });
  assert.equal(members.members.map((m: any) => m.userId).slice(0, 2).sort(), ["alice", "bob"]);
  assert.equal(members.members.map((m: any) => m.userId).slice(2).sort(), ["carol", "dan"]);
  // carol was added by bob, and the retry did not change that.
  assert.is(members.members.find((m: any) => m.userId === "carol").addedBy, "bob");
  assert.is((await alice.getChat(chat.id)).memberCount, 4);
  // The new member has access at once.
  const [carol] = await users(alice.tenant, "carol");
  assert.is((await carol.getChat(chat.id)).memberCount, 4);
});

test("AddMembers - only members may add (non-member → NOT_FOUND, nobody added)", async () => {
  const [alice, eve] = await users(uniqueTenant(), "alice", "eve");
  const chat = await alice.createChat("closed", ["bob"]);
  await rejects(eve.call("AddMembers", { chatId: chat.id, userIds: ["eve", "mallory"] }), grpc.status.NOT_FOUND, "AddMembers by non-member");
  assert.equal((await memberIds(alice, chat.id)).sort(), ["alice", "bob"]);
  assert.is((await alice.getChat(chat.id)).memberCount, 2);
  await rejects(eve.getChat(chat.id), grpc.status.NOT_FOUND, "eve still no member");
});

test("RemoveMember - removing another member revokes its access to every RPC at once", async () => {
  const [alice, bob] = await users(uniqueTenant(), "alice", "bob");
  const chat = await alice.createChat("kick", ["bob", "carol"]);
  const msg = await bob.send(chat.id, "before");
  const res = await alice.call("RemoveMember", { chatId: chat.id, userId: "bob" });
  assert.equal(res, {});
  const nf = grpc.status.NOT_FOUND;
  await rejects(bob.getChat(chat.id), nf, "GetChat after removal");
  await rejects(bob.send(chat.id, "after"), nf, "SendMessage after removal");
  await rejects(bob.call("ListMessages", { chatId: chat.id }), nf, "ListMessages after removal");
  await rejects(bob.call("GetMessage", { chatId: chat.id, messageId: msg.id }), nf, "GetMessage after removal");
  await rejects(bob.call("ListMembers", { chatId: chat.id }), nf, "ListMembers after removal");
  await rejects(bob.call("AddMembers", { chatId: chat.id, userIds: ["bob"] }), nf, "AddMembers after removal");
  await rejects(bob.call("MarkRead", { chatId: chat.id, sequence: 1 }), nf, "MarkRead after removal");
  await rejects(bob.call("RemoveMember", { chatId: chat.id, userId: "carol" }), nf, "RemoveMember after removal");
  assert.equal((await bob.call("ListChats", {})).chats, []);
  // The others still see the chat without bob, and the failed send left no message.
  const c = await alice.getChat(chat.id);
  assert.is(c.memberCount, 2);
  assert.is(c.lastSequence, "1");
  assert.equal((await memberIds(alice, chat.id)).sort(), ["alice", "carol"]);
});

test("RemoveMember - a member can leave (self-remove)", async () => {
  const [alice, carol] = await users(uniqueTenant(), "alice", "carol");
  const chat = await alice.createChat("leave", ["carol"]);
  await carol.call("RemoveMember", { chatId: chat.id, userId: "carol" });
  await rejects(carol.getChat(chat.id), grpc.status.NOT_FOUND, "GetChat after leaving");
  assert.equal((await carol.call("ListChats", {})).chats, []);
  assert.equal(await memberIds(alice, chat.id), ["alice"]);
  assert.is((await alice.getChat(chat.id)).memberCount, 1);
  // The creator may leave too.
  await alice.call("RemoveMember", { chatId: chat.id, userId: "alice" });
  await rejects(alice.getChat(chat.id), grpc.status.NOT_FOUND, "creator after leaving");
});

test("RemoveMember - removing a non-member (or twice) is NOT_FOUND and changes nothing", async () => {
  const [alice, eve] = await users(uniqueTenant(), "alice", "eve");
  const chat = await alice.createChat("nf", ["bob"]);
  await rejects(alice.call("RemoveMember", { chatId: chat.id, userId: "nobody" }), grpc.status.NOT_FOUND, "remove non-member");
  await alice.call("RemoveMember", { chatId: chat.id, userId: "bob" });
  await rejects(alice.call("RemoveMember", { chatId: chat.id, userId: "bob" }), grpc.status.NOT_FOUND, "remove twice");
  // A non-member cannot remove anyone.
  await rejects(eve.call("RemoveMember", { chatId: chat.id, userId: "alice" }), grpc.status.NOT_FOUND, "remove by non-member");
  assert.equal(await memberIds(alice, chat.id), ["alice"]);
  assert.is((await alice.getChat(chat.id)).memberCount, 1);
});

// ---------------------------------------------------------------------------------------------------
// MessageService

test("SendMessage - sequences 1, 2, 3 … per chat with all fields set", async () => {
  const [alice, bob] = await users(uniqueTenant(), "alice", "bob");
  const chat = await alice.createChat("seq", ["bob"]);
  const other = await alice.createChat("other", ["bob"]);
  const m1 = await alice.send(chat.id, "one");
  const o1 = await bob.send(other.id, "other one");
  const m2 = await bob.send(chat.id, "two");
  const m3 = await alice.send(chat.id, "three");
  assert.equal([m1, m2, m3].map((m) => m.sequence), ["1", "2", "3"]);
  assert.is(o1.sequence, "1", "sequences are per chat");
  assert.equal([m1, m2, m3].map((m) => m.senderId), ["alice", "bob", "alice"]);
  assert.equal([m1, m2, m3].map((m) => m.chatId), [chat.id, chat.id, chat.id]);
  assert.equal([m1, m2, m3].map((m) => m.text), ["one", "two", "three"]);
  assert.equal([m1, m2, m3].map((m) => m.clientMessageId), ["", "", ""]);
  assert.is(new Set([m1.id, m2.id, m3.id, o1.id]).size, 4, "distinct ids");
  for (const m of [m1, m2, m3]) assert.ok(Math.abs(tsMillis(m.createTime) - Date.now()) < 60_000, "create_time is now");
  assert.ok(tsMillis(m3.createTime) >= tsMillis(m1.createTime), "create_time ordered");
  const c = await bob.getChat(chat.id);
  assert.is(c.lastSequence, "3");
  assert.is(tsMillis(c.lastMessageTime), tsMillis(m3.createTime), "last_message_time = newest message's create_time");
});

test("SendMessage - text of exactly 4,096 characters is accepted", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const chat = await alice.createChat("long");
  const text = "x".repeat(4096);
  const m = await alice.send(chat.id, text);
  assert.is(m.text.length, 4096);
  assert.is((await alice.call("GetMessage", { chatId: chat.id, messageId: m.id })).message.text, text);
});

test("SendMessage - client_message_id retry returns the original message and consumes no sequence", async () => {
  const [alice, bob] = await users(uniqueTenant(), "alice", "bob");
  const chat = await alice.createChat("idem", ["bob"]);
  const first = await alice.send(chat.id, "hello", "cmid-1");
  assert.is(first.sequence, "1");
  assert.is(first.clientMessageId, "cmid-1");
  const retry = await alice.send(chat.id, "hello", "cmid-1");
  assert.is(retry.id, first.id);
  assert.is(retry.sequence, "1");
  assert.is(retry.text, "hello");
  assert.is(tsMillis(retry.createTime), tsMillis(first.createTime));
  // The key is per sender: bob's identical key is a new message.
  const bobs = await bob.send(chat.id, "bob hello", "cmid-1");
  assert.is(bobs.sequence, "2");
  assert.is.not(bobs.id, first.id);
  // The key is per chat: the same key in another chat is a new message.
  const chat2 = await alice.createChat("idem2");
  assert.is((await alice.send(chat2.id, "hello", "cmid-1")).sequence, "1");
  // Concurrent retries of one new key: one message.
  const burst = await Promise.all(range(1, 8).map(() => alice.send(chat.id, "burst", "cmid-burst")));
  assert.is(new Set(burst.map((m) => m.id)).size, 1, "concurrent retries return one message");
  assert.is(burst[0].sequence, "3");
  const next = await alice.send(chat.id, "next");
  assert.is(next.sequence, "4", "retries consumed no sequence");
  const listed = await allMessages(alice, chat.id, { order: "ORDER_OLDEST_FIRST" });
  assert.equal(seqs(listed), [1, 2, 3, 4]);
  assert.equal(listed.map((m) => m.text), ["hello", "bob hello", "burst", "next"]);
  assert.equal(listed.map((m) => m.clientMessageId), ["cmid-1", "cmid-1", "cmid-burst", ""]);
});

test("ListMessages - unspecified order is newest first; both explicit orders", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const chat = await alice.createChat("order");
  await sendMany(alice, chat.id, 5);
  const list = async (order?: string) =>
    (await alice.call("ListMessages", { chatId: chat.id, ...(order ? { order } : {}) })).messages;
  assert.equal(seqs(await list()), [5, 4, 3, 2, 1]);
  assert.equal(seqs(await list("ORDER_UNSPECIFIED")), [5, 4, 3, 2, 1]);
  assert.equal(seqs(await list("ORDER_NEWEST_FIRST")), [5, 4, 3, 2, 1]);
  const oldest = await list("ORDER_OLDEST_FIRST");
  assert.equal(seqs(oldest), [1, 2, 3, 4, 5]);
  assert.equal(oldest.map((m: any) => m.text), ["m1", "m2", "m3", "m4", "m5"]);
  assert.ok(oldest.every((m: any) => m.chatId === chat.id && m.senderId === "alice" && m.id));
  const res = await alice.call("ListMessages", { chatId: chat.id });
  assert.is(res.nextPageToken, "");
  // Empty chat: empty list.
  const empty = await alice.createChat("empty");
  const none = await alice.call("ListMessages", { chatId: empty.id });
  assert.equal(none.messages, []);
  assert.is(none.nextPageToken, "");
});

test("ListMessages - after_sequence and before_sequence are exclusive, in both orders", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const chat = await alice.createChat("bounds");
  await sendMany(alice, chat.id, 8);
  const list = async (req: object) => seqs((await alice.call("ListMessages", { chatId: chat.id, ...req })).messages);
  assert.equal(await list({ afterSequence: 2, beforeSequence: 6, order: "ORDER_OLDEST_FIRST" }), [3, 4, 5]);
  assert.equal(await list({ afterSequence: 2, beforeSequence: 6, order: "ORDER_NEWEST_FIRST" }), [5, 4, 3]);
  assert.equal(await list({ afterSequence: 2, beforeSequence: 6 }), [5, 4, 3]);
  assert.equal(await list({ afterSequence: 6, order: "ORDER_OLDEST_FIRST" }), [7, 8]);
  assert.equal(await list({ afterSequence: 6 }), [8, 7]);
  assert.equal(await list({ beforeSequence: 3, order: "ORDER_OLDEST_FIRST" }), [1, 2]);
  assert.equal(await list({ beforeSequence: 3 }), [2, 1]);
  assert.equal(await list({ afterSequence: 8 }), []);
  assert.equal(await list({ afterSequence: 3, beforeSequence: 4 }), []);
});

test("ListMessages - start_time inclusive, end_time exclusive, in both orders", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const chat = await alice.createChat("times");
  const sent: any[] = [];
  for (let i = 1; i <= 5; i++) {
    sent.push(await alice.send(chat.id, `t${i}`));
    await sleep(20);
  }
  const times = sent.map((m) => tsMillis(m.createTime));
  for (let i = 1; i < times.length; i++) assert.ok(times[i]! > times[i - 1]!, "distinct create_times");
  const list = async (req: object) => seqs((await alice.call("ListMessages", { chatId: chat.id, ...req })).messages);
  const start = sent[1].createTime; // message 2
  const end = sent[3].createTime; // message 4
  assert.equal(await list({ startTime: start, endTime: end, order: "ORDER_OLDEST_FIRST" }), [2, 3]);
  assert.equal(await list({ startTime: start, endTime: end }), [3, 2]);
  assert.equal(await list({ startTime: start, order: "ORDER_OLDEST_FIRST" }), [2, 3, 4, 5]);
  assert.equal(await list({ endTime: end, order: "ORDER_OLDEST_FIRST" }), [1, 2, 3]);
  assert.equal(await list({ startTime: start, endTime: start }), []);
  // Combined with sequence bounds.
  assert.equal(await list({ startTime: start, afterSequence: 2, order: "ORDER_OLDEST_FIRST" }), [3, 4, 5]);
  // A start just after message 2 excludes it.
  const ms = times[1]! + 1;
  const justAfter = { seconds: String(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1e6 };
  assert.equal(await list({ startTime: justAfter, order: "ORDER_OLDEST_FIRST" }), [3, 4, 5]);
  // The ends of Timestamp's range are valid bounds (the last nanosecond of 9999 rounds past the year).
  const first = { seconds: "-62135596800", nanos: 0 };
  const last = { seconds: "253402300799", nanos: 999_999_999 };
  assert.equal(await list({ startTime: first, endTime: last, order: "ORDER_OLDEST_FIRST" }), [1, 2, 3, 4, 5]);
  assert.equal(await list({ startTime: last }), []);
});

test("GetMessage - returns the message; wrong chat, unknown id, other tenant → NOT_FOUND", async () => {
  const [alice, bob] = await users(uniqueTenant(), "alice", "bob");
  const chat = await alice.createChat("get", ["bob"]);
  const other = await alice.createChat("other");
  const m = await bob.send(chat.id, "find me", "k1");
  const got = (await alice.call("GetMessage", { chatId: chat.id, messageId: m.id })).message;
  assert.is(got.id, m.id);
  assert.is(got.chatId, chat.id);
  assert.is(got.senderId, "bob");
  assert.is(got.text, "find me");
  assert.is(got.sequence, "1");
  assert.is(got.clientMessageId, "k1");
  assert.is(tsMillis(got.createTime), tsMillis(m.createTime));
  await rejects(alice.call("GetMessage", { chatId: other.id, messageId: m.id }), grpc.status.NOT_FOUND, "message via another chat of the caller");
  await rejects(alice.call("GetMessage", { chatId: chat.id, messageId: unknownIdLike(m.id) }), grpc.status.NOT_FOUND, "unknown message id");
  const [otherBob] = await users(uniqueTenant(), "bob");
  await rejects(otherBob.call("GetMessage", { chatId: chat.id, messageId: m.id }), grpc.status.NOT_FOUND, "other tenant");
});

// ---------------------------------------------------------------------------------------------------
// Pagination

test("pagination - chats: 4 pages of 2, no loss, no repeat, empty token on the last page", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const created: string[] = [];
  for (let i = 0; i < 7; i++) {
    created.push((await alice.createChat(`p${i}`)).id);
    await sleep(5);
  }
  const result = await pages(alice, "ListChats", { pageSize: 2 }, "chats");
  assert.equal(result.map((p) => p.length), [2, 2, 2, 1]);
  const ids = result.flat().map((c) => c.id);
  assert.equal(ids, [...created].reverse(), "all chats, newest first, once each");
  // Activity while paging is no reason to lose chats that did not move.
  const first = await alice.call("ListChats", { pageSize: 3 });
  const second = await alice.call("ListChats", { pageSize: 3, pageToken: first.nextPageToken });
  assert.equal(second.chats.map((c: any) => c.id), [created[3], created[2], created[1]]);
});

test("pagination - members: 3 pages, join order kept across pages", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const chat = await alice.createChat("mp");
  for (let i = 1; i <= 7; i++) await alice.call("AddMembers", { chatId: chat.id, userIds: [`u${i}`] });
  const result = await pages(alice, "ListMembers", { chatId: chat.id, pageSize: 3 }, "members");
  assert.equal(result.map((p) => p.length), [3, 3, 2]);
  assert.equal(result.flat().map((m) => m.userId), ["alice", "u1", "u2", "u3", "u4", "u5", "u6", "u7"]);
  // Exactly page-size members: no extra empty page is required, and never a repeat.
  const exact = await pages(alice, "ListMembers", { chatId: chat.id, pageSize: 4 }, "members");
  assert.equal(exact.flat().map((m) => m.userId), ["alice", "u1", "u2", "u3", "u4", "u5", "u6", "u7"]);
});

test("pagination - messages: pages in both orders and with filters, no loss, no repeat", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const chat = await alice.createChat("msgp");
  await sendMany(alice, chat.id, 10);
  const newest = await pages(alice, "ListMessages", { chatId: chat.id, pageSize: 3 }, "messages");
  assert.equal(newest.map((p) => p.length), [3, 3, 3, 1]);
  assert.equal(seqs(newest.flat()), range(1, 10).reverse());
  const oldest = await pages(alice, "ListMessages", { chatId: chat.id, pageSize: 3, order: "ORDER_OLDEST_FIRST" }, "messages");
  assert.equal(oldest.map((p) => p.length), [3, 3, 3, 1]);
  assert.equal(seqs(oldest.flat()), range(1, 10));
  const filtered = await pages(
    alice,
    "ListMessages",
    { chatId: chat.id, pageSize: 2, afterSequence: 2, beforeSequence: 10, order: "ORDER_OLDEST_FIRST" },
    "messages",
  );
  assert.equal(seqs(filtered.flat()), range(3, 9));
  assert.ok(filtered.length >= 3, "3+ pages");
  // New messages arriving while paging newest-first do not shift older pages.
  const p1 = await alice.call("ListMessages", { chatId: chat.id, pageSize: 4 });
  await alice.send(chat.id, "m11");
  const p2 = await alice.call("ListMessages", { chatId: chat.id, pageSize: 4, pageToken: p1.nextPageToken });
  assert.equal(seqs(p2.messages), [6, 5, 4, 3]);
});

test("pagination - messages: page_size default 50, larger than 200 clamped to 200", async () => {
  const users3 = await users(uniqueTenant(), "alice", "bob", "carol");
  const [alice] = users3;
  const chat = await alice.createChat("big", ["bob", "carol"]);
  // 252 messages from 3 senders in parallel (the main server's rate limit is high).
  await Promise.all(users3.map((u) => sendMany(u, chat.id, 84, `${u.name}-`)));
  const def = await alice.call("ListMessages", { chatId: chat.id });
  assert.is(def.messages.length, 50, "default page size");
  assert.ok(def.nextPageToken, "more pages");
  assert.equal(seqs(def.messages), range(203, 252).reverse());
  const clamped = await alice.call("ListMessages", { chatId: chat.id, pageSize: 1000, order: "ORDER_OLDEST_FIRST" });
  assert.is(clamped.messages.length, 200, "clamped to 200");
  assert.equal(seqs(clamped.messages), range(1, 200));
  assert.ok(clamped.nextPageToken);
  const rest = await alice.call("ListMessages", { chatId: chat.id, pageSize: 1000, order: "ORDER_OLDEST_FIRST", pageToken: clamped.nextPageToken });
  assert.equal(seqs(rest.messages), range(201, 252));
  assert.is(rest.nextPageToken, "");
  const exact = await alice.call("ListMessages", { chatId: chat.id, pageSize: 200 });
  assert.is(exact.messages.length, 200);
});

test("pagination - members: page_size default 50, larger than 200 clamped to 200", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const ids = range(1, 250).map((i) => `member-${String(i).padStart(3, "0")}`);
  const chat = await alice.createChat("many", ids);
  assert.is(chat.memberCount, 251);
  const def = await alice.call("ListMembers", { chatId: chat.id });
  assert.is(def.members.length, 50);
  assert.ok(def.nextPageToken);
  const clamped = await alice.call("ListMembers", { chatId: chat.id, pageSize: 100000 });
  assert.is(clamped.members.length, 200);
  const rest = await alice.call("ListMembers", { chatId: chat.id, pageSize: 100000, pageToken: clamped.nextPageToken });
  assert.is(rest.members.length, 51);
  assert.is(rest.nextPageToken, "");
  const all = [...clamped.members, ...rest.members].map((m: any) => m.userId);
  assert.equal([...all].sort(), ["alice", ...ids].sort());
});

test("pagination - chats: page_size default 50, larger than 200 clamped to 200", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  for (let i = 0; i < 210; i += 30) {
    await Promise.all(range(i, Math.min(i + 29, 209)).map((n) => alice.createChat(`c${n}`)));
  }
  const def = await alice.call("ListChats", {});
  assert.is(def.chats.length, 50);
  assert.ok(def.nextPageToken);
  const clamped = await alice.call("ListChats", { pageSize: 500 });
  assert.is(clamped.chats.length, 200);
  const rest = await alice.call("ListChats", { pageSize: 500, pageToken: clamped.nextPageToken });
  assert.is(rest.chats.length, 10);
  assert.is(rest.nextPageToken, "");
  const names = new Set([...clamped.chats, ...rest.chats].map((c: any) => c.name));
  assert.is(names.size, 210, "no loss, no repeat");
});

function tamper(token: string): string[] {
  const mid = Math.floor(token.length / 2);
  const flip = (i: number) => token.slice(0, i) + (token[i] === "A" ? "B" : "A") + token.slice(i + 1);
  return [flip(mid), flip(token.length - 2), flip(1), `${token}x`, token.slice(0, -3), "not-a-page-token", "%%%"];
}

test("pagination - tampered or garbage page tokens → INVALID_ARGUMENT naming page_token", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const chat = await alice.createChat("tamper", ["b1", "b2", "b3"]);
  await alice.createChat("second");
  await alice.createChat("third");
  await sendMany(alice, chat.id, 5);
  const chatsToken = (await alice.call("ListChats", { pageSize: 1 })).nextPageToken;
  const membersToken = (await alice.call("ListMembers", { chatId: chat.id, pageSize: 1 })).nextPageToken;
  const messagesToken = (await alice.call("ListMessages", { chatId: chat.id, pageSize: 1 })).nextPageToken;
  assert.ok(chatsToken && membersToken && messagesToken, "tokens issued");
  for (const bad of tamper(chatsToken)) {
    await invalid(alice.call("ListChats", { pageSize: 1, pageToken: bad }), "page_token", `ListChats token ${bad}`);
  }
  for (const bad of tamper(membersToken)) {
    await invalid(alice.call("ListMembers", { chatId: chat.id, pageSize: 1, pageToken: bad }), "page_token", `ListMembers token ${bad}`);
  }
  for (const bad of tamper(messagesToken)) {
    await invalid(alice.call("ListMessages", { chatId: chat.id, pageSize: 1, pageToken: bad }), "page_token", `ListMessages token ${bad}`);
  }
});

test("pagination - a token reused with another chat, order or filter → INVALID_ARGUMENT", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const a = await alice.createChat("a", ["x1", "x2", "x3"]);
  const b = await alice.createChat("b", ["y1", "y2", "y3"]);
  await sendMany(alice, a.id, 6);
  await sendMany(alice, b.id, 6);
  const base = { chatId: a.id, pageSize: 2, afterSequence: 1, order: "ORDER_OLDEST_FIRST" };
  const { nextPageToken: token } = await alice.call("ListMessages", base);
  assert.ok(token);
  // Same request continues fine.
  const ok = await alice.call("ListMessages", { ...base, pageToken: token });
  assert.equal(seqs(ok.messages), [4, 5]);
  const variants: [string, object][] = [
    ["other chat", { chatId: b.id }],
    ["other order", { order: "ORDER_NEWEST_FIRST" }],
    ["unspecified order", { order: "ORDER_UNSPECIFIED" }],
    ["other after_sequence", { afterSequence: 2 }],
    ["added before_sequence", { beforeSequence: 6 }],
    ["added start_time", { startTime: { seconds: "1", nanos: 0 } }],
    ["added end_time", { endTime: { seconds: String(Math.floor(Date.now() / 1000) + 3600), nanos: 0 } }],
  ];
  for (const [label, change] of variants) {
    await invalid(alice.call("ListMessages", { ...base, ...change, pageToken: token }), "page_token", `ListMessages token with ${label}`);
  }
  const { nextPageToken: mt } = await alice.call("ListMembers", { chatId: a.id, pageSize: 2 });
  assert.ok(mt);
  await invalid(alice.call("ListMembers", { chatId: b.id, pageSize: 2, pageToken: mt }), "page_token", "ListMembers token with other chat");
});

// ---------------------------------------------------------------------------------------------------
// INVALID_ARGUMENT / NOT_FOUND

test("errors - bad text: empty, > 4,096 characters, NUL → INVALID_ARGUMENT naming text; nothing stored", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const chat = await alice.createChat("bad text");
  await invalid(alice.send(chat.id, ""), "text", "empty text");
  await invalid(alice.send(chat.id, "x".repeat(4097)), "text", "4097 chars");
  await invalid(alice.send(chat.id, "a\u0000b"), "text", "NUL in text");
  await invalid(alice.send(chat.id, "\u0000"), "text", "only NUL");
  assert.is((await alice.getChat(chat.id)).lastSequence, "0");
  assert.equal((await alice.call("ListMessages", { chatId: chat.id })).messages, []);
});

test("errors - name > 200 characters, NUL in name → INVALID_ARGUMENT naming name; no chat created", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  await invalid(alice.createChat("n".repeat(201)), "name", "201-char name");
  await invalid(alice.createChat("bad\u0000name"), "name", "NUL in name");
  assert.equal((await alice.call("ListChats", {})).chats, []);
});

test("errors - more than 1,000 ids in one request → INVALID_ARGUMENT; 1,000 is fine", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const ids = (n: number, p = "u") => range(1, n).map((i) => `${p}${i}`);
  await invalid(alice.createChat("too many", ids(1001)), "member_ids", "CreateChat with 1001 ids");
  assert.equal((await alice.call("ListChats", {})).chats, []);
  const chat = await alice.createChat("ok", ids(1000));
  assert.is(chat.memberCount, 1001);
  await invalid(alice.call("AddMembers", { chatId: chat.id, userIds: ids(1001, "v") }), "user_ids", "AddMembers with 1001 ids");
  assert.is((await alice.getChat(chat.id)).memberCount, 1001);
  const added = await alice.call("AddMembers", { chatId: chat.id, userIds: ids(1000, "v") });
  assert.is(added.added.length, 1000);
  assert.is((await alice.getChat(chat.id)).memberCount, 2001);
});

test("errors - malformed chat ids → INVALID_ARGUMENT naming chat_id, for every RPC taking one", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const chat = await alice.createChat("real");
  const msg = await alice.send(chat.id, "x");
  for (const bad of ["", "not-a-chat-id", "12345", `${chat.id}x`, "'; drop table chats; --"]) {
    const requests: [Rpc, object][] = [
      ["GetChat", { chatId: bad }],
      ["MarkRead", { chatId: bad, sequence: 1 }],
      ["ListMembers", { chatId: bad }],
      ["AddMembers", { chatId: bad, userIds: ["bob"] }],
      ["RemoveMember", { chatId: bad, userId: "alice" }],
      ["SendMessage", { chatId: bad, text: "x" }],
      ["ListMessages", { chatId: bad }],
      ["GetMessage", { chatId: bad, messageId: msg.id }],
    ];
    for (const [rpc, request] of requests) await invalid(alice.call(rpc, request), "chat_id", `${rpc} chat_id=${JSON.stringify(bad)}`);
  }
});

test("errors - malformed message id and user ids → INVALID_ARGUMENT naming the field", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const chat = await alice.createChat("ids");
  for (const bad of ["", "nope", "123"]) {
    await invalid(alice.call("GetMessage", { chatId: chat.id, messageId: bad }), "message_id", `message_id=${JSON.stringify(bad)}`);
  }
  await invalid(alice.createChat("x", ["bob", ""]), "member_ids", "empty member id");
  await invalid(alice.createChat("x", ["a\u0001b"]), "member_ids", "control char in member id");
  await invalid(alice.createChat("x", ["u".repeat(129)]), "member_ids", "129-char member id");
  await invalid(alice.call("AddMembers", { chatId: chat.id, userIds: [""] }), "user_ids", "empty user id");
  await invalid(alice.call("AddMembers", { chatId: chat.id, userIds: ["u".repeat(129)] }), "user_ids", "129-char user id");
  await invalid(alice.call("RemoveMember", { chatId: chat.id, userId: "" }), "user_id", "empty user_id");
  assert.equal(await memberIds(alice, chat.id), ["alice"]);
});

test("errors - negative page_size → INVALID_ARGUMENT naming page_size", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const chat = await alice.createChat("ps");
  await invalid(alice.call("ListChats", { pageSize: -1 }), "page_size", "ListChats");
  await invalid(alice.call("ListMembers", { chatId: chat.id, pageSize: -5 }), "page_size", "ListMembers");
  await invalid(alice.call("ListMessages", { chatId: chat.id, pageSize: -1 }), "page_size", "ListMessages");
});

test("errors - start_time after end_time → INVALID_ARGUMENT naming one of them", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const chat = await alice.createChat("tt");
  const now = Math.floor(Date.now() / 1000);
  await invalid(
    alice.call("ListMessages", { chatId: chat.id, startTime: { seconds: String(now), nanos: 0 }, endTime: { seconds: String(now - 60), nanos: 0 } }),
    ["start_time", "end_time"],
    "start after end",
  );
  await invalid(
    alice.call("ListMessages", { chatId: chat.id, startTime: { seconds: String(now), nanos: 1_000_000 }, endTime: { seconds: String(now), nanos: 0 } }),
    ["start_time", "end_time"],
    "start 1 ms after end",
  );
});

test("errors - negative sequences and a client_message_id over 64 characters → INVALID_ARGUMENT", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const chat = await alice.createChat("misc");
  await invalid(alice.send(chat.id, "x", "k".repeat(65)), "client_message_id", "65-char client_message_id");
  const ok = await alice.send(chat.id, "x", "k".repeat(64));
  assert.is(ok.clientMessageId, "k".repeat(64));
  await invalid(alice.call("ListMessages", { chatId: chat.id, afterSequence: -1 }), "after_sequence", "after_sequence -1");
  await invalid(alice.call("ListMessages", { chatId: chat.id, beforeSequence: -1 }), "before_sequence", "before_sequence -1");
  assert.is((await alice.getChat(chat.id)).lastSequence, "1");
});

test("errors - well-formed ids that do not exist (or belong to another tenant) → NOT_FOUND for every RPC", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const chat = await alice.createChat("mine", ["bob"]);
  const msg = await alice.send(chat.id, "mine");
  const [intruder] = await users(uniqueTenant(), "alice"); // same user name, other tenant
  const ghostChat = unknownIdLike(chat.id);
  const nf = grpc.status.NOT_FOUND;
  for (const [who, user, chatId] of [
    ["unknown chat", alice, ghostChat],
    ["other tenant", intruder, chat.id],
  ] as [string, User, string][]) {
    const requests: [Rpc, object][] = [
      ["GetChat", { chatId }],
      ["MarkRead", { chatId, sequence: 1 }],
      ["ListMembers", { chatId }],
      ["AddMembers", { chatId, userIds: ["carol"] }],
      ["RemoveMember", { chatId, userId: "bob" }],
      ["SendMessage", { chatId, text: "x" }],
      ["ListMessages", { chatId }],
      ["GetMessage", { chatId, messageId: msg.id }],
    ];
    for (const [rpc, request] of requests) await rejects(user.call(rpc, request), nf, `${rpc} (${who})`);
  }
  // Uppercase is still the same well-formed id space; a random unknown message in a real chat:
  await rejects(alice.call("GetMessage", { chatId: chat.id, messageId: unknownIdLike(msg.id) }), nf, "unknown message");
  // The intruder changed nothing.
  const c = await alice.getChat(chat.id);
  assert.is(c.memberCount, 2);
  assert.is(c.lastSequence, "1");
  assert.equal((await memberIds(alice, chat.id)).sort(), ["alice", "bob"]);
});

// Raw protobuf requests: what a buggy or hostile client may send.

function varint(n: number): number[] {
  const out: number[] = [];
  while (n > 0x7f) {
    out.push((n & 0x7f) | 0x80);
    n >>>= 7;
  }
  out.push(n);
  return out;
}

/** A length-delimited field (strings, bytes). */
function lengthField(field: number, bytes: Uint8Array | string): number[] {
  const b = typeof bytes === "string" ? Buffer.from(bytes, "utf8") : bytes;
  return [...varint((field << 3) | 2), ...varint(b.length), ...b];
}

/** Calls path with raw request bytes on a grpc-js client (optionally gzip-compressing requests). */
function rawBytesCall(path: string, bytes: number[], token: string, gzip = false): Promise<Buffer> {
  const client = new grpc.Client(
    main.address,
    grpc.credentials.createInsecure(),
    gzip ? { "grpc.default_compression_algorithm": grpc.compressionAlgorithms.gzip } : {},
  );
  return new Promise<Buffer>((resolve, reject) => {
    client.makeUnaryRequest(
      path,
      (b: Buffer) => b,
      (b: Buffer) => b,
      Buffer.from(bytes),
      grpcMetadata(token),
      { deadline: Date.now() + 20_000 },
      (error, value) => (error ? reject(error) : resolve(value!)),
    );
  }).finally(() => client.close());
}

const SEND = "/parley.v1.MessageService/SendMessage";
const CREATE = "/parley.v1.ChatService/CreateChat";
const LIST_MESSAGES = "/parley.v1.MessageService/ListMessages";

const undecodable: [string, number[]][] = [
  ["truncated length", [0x0a, 0x7f, 0x61]],
  ["bad varint", [0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]],
  ["wire type 7", [0x0f, 0x01]],
  ["field number 0", [0x02, 0x01, 0x61]],
];

test("errors - undecodable protobuf request bytes → INVALID_ARGUMENT, never INTERNAL", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const token = await tokenFor(alice.tenant, "alice");
  const chat = await alice.createChat("raw");
  // Sanity: hand-encoded valid bytes work.
  await rawBytesCall(SEND, [...lengthField(1, chat.id), ...lengthField(2, "raw hello")], token);
  for (const [label, bytes] of undecodable) {
    for (const path of [SEND, CREATE, LIST_MESSAGES]) {
      await rejects(rawBytesCall(path, bytes, token), grpc.status.INVALID_ARGUMENT, `${path} with ${label}`);
    }
  }
  assert.is((await alice.getChat(chat.id)).lastSequence, "1");
  assert.is((await alice.call("ListChats", {})).chats.length, 1);
});

test("errors - undecodable gzip-compressed request bytes → INVALID_ARGUMENT, never INTERNAL", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const token = await tokenFor(alice.tenant, "alice");
  const chat = await alice.createChat("gz");
  // Sanity: a valid compressed request works.
  await rawBytesCall(SEND, [...lengthField(1, chat.id), ...lengthField(2, "gzip hello")], token, true);
  assert.is((await alice.getChat(chat.id)).lastSequence, "1");
  for (const [label, bytes] of undecodable) {
    await rejects(rawBytesCall(SEND, bytes, token, true), grpc.status.INVALID_ARGUMENT, `gzip SendMessage with ${label}`);
  }
  assert.is((await alice.getChat(chat.id)).lastSequence, "1");
});

test("errors - invalid UTF-8 in text or name → INVALID_ARGUMENT; nothing stored", async () => {
  const [alice] = await users(uniqueTenant(), "alice");
  const token = await tokenFor(alice.tenant, "alice");
  const chat = await alice.createChat("utf8");
  const bad = [
    new Uint8Array([0x68, 0x69, 0xff, 0xfe]), // never valid in UTF-8
    new Uint8Array([0xed, 0xa0, 0x80]), // an encoded lone surrogate
    new Uint8Array([0xc3]), // truncated sequence
  ];
  for (const bytes of bad) {
    await rejects(
      rawBytesCall(SEND, [...lengthField(1, chat.id), ...lengthField(2, bytes)], token),
      grpc.status.INVALID_ARGUMENT,
      `SendMessage text bytes ${Buffer.from(bytes).toString("hex")}`,
    );
    await rejects(
      rawBytesCall(CREATE, lengthField(1, bytes), token),
      grpc.status.INVALID_ARGUMENT,
      `CreateChat name bytes ${Buffer.from(bytes).toString("hex")}`,
    );
  }
  assert.is((await alice.getChat(chat.id)).lastSequence, "0");
  assert.equal((await alice.call("ListMessages", { chatId: chat.id })).messages, []);
  assert.is((await alice.call("ListChats", {})).chats.length, 1);
});

// ---------------------------------------------------------------------------------------------------
// RESOURCE_EXHAUSTED (limits server: PARLEY_SEND_RATE=1, PARLEY_SEND_BURST=3, PARLEY_MAX_MEMBERS=3)

test("rate limit - the 4th quick send is RESOURCE_EXHAUSTED with RetryInfo and consumes no sequence", async () => {
  const tenant = uniqueTenant();
  const alice = await userOf(tenant, "alice", () => limitStubs);
  const bob = await userOf(tenant, "bob", () => limitStubs);
  const chat = await alice.createChat("rl", ["bob"]);
  const ok = [await alice.send(chat.id, "1"), await alice.send(chat.id, "2"), await alice.send(chat.id, "3")];
  assert.equal(seqs(ok), [1, 2, 3]);
  const error = await rejects(alice.send(chat.id, "4"), grpc.status.RESOURCE_EXHAUSTED, "4th send");
  const retry = statusDetails(error).find((d) => d.typeUrl.endsWith("/google.rpc.RetryInfo"));
  assert.ok(retry, "RetryInfo detail present");
  const delay = fromBinary(RetryInfoSchema, retry!.value).retryDelay;
  assert.ok(delay, "retry_delay set");
  const delayMs = Number(delay!.seconds) * 1000 + delay!.nanos / 1e6;
  assert.ok(delayMs > 0 && delayMs <= 5000, `retry_delay ${delayMs} ms is positive and about 1/rate`);
  // The limit is per user: bob can still send, and gets the next sequence (the failure used none).
  const bobs = await bob.send(chat.id, "bob");
  assert.is(bobs.sequence, "4");
  // After waiting the advised delay alice can send again.
  await sleep(delayMs + 100);
  const later = await alice.send(chat.id, "5");
  assert.is(later.sequence, "5");
  assert.equal(seqs(await allMessages(alice, chat.id, { order: "ORDER_OLDEST_FIRST" })), [1, 2, 3, 4, 5]);
});

test("member cap - AddMembers beyond PARLEY_MAX_MEMBERS is RESOURCE_EXHAUSTED and adds nobody", async () => {
  const tenant = uniqueTenant();
  const alice = await userOf(tenant, "alice", () => limitStubs);
  const chat = await alice.createChat("cap", ["bob"]);
  const err = await rejects(alice.call("AddMembers", { chatId: chat.id, userIds: ["carol", "dave"] }), grpc.status.RESOURCE_EXHAUSTED, "2 over cap");
  assert.ok(err.details, "error has a message");
  const members = (await alice.call("ListMembers", { chatId: chat.id })).members.map((m: any) => m.userId);
  assert.equal(members.sort(), ["alice", "bob"], "nobody added");
  assert.is((await alice.getChat(chat.id)).memberCount, 2);
  // Already-members do not count against the cap.
  const added = await alice.call("AddMembers", { chatId: chat.id, userIds: ["bob", "carol"] });
  assert.equal(added.added.map((m: any) => m.userId), ["carol"]);
  await rejects(alice.call("AddMembers", { chatId: chat.id, userIds: ["dave"] }), grpc.status.RESOURCE_EXHAUSTED, "4th member");
  assert.is((await alice.getChat(chat.id)).memberCount, 3);
  // Re-adding existing members at the cap is a harmless no-op.
  assert.equal((await alice.call("AddMembers", { chatId: chat.id, userIds: ["carol"] })).added, []);
  // After someone leaves there is room again.
  await alice.call("RemoveMember", { chatId: chat.id, userId: "bob" });
  assert.equal((await alice.call("AddMembers", { chatId: chat.id, userIds: ["dave"] })).added.map((m: any) => m.userId), ["dave"]);
});

test("member cap - CreateChat with more initial members than the cap fails and creates nothing", async () => {
  const tenant = uniqueTenant();
  const alice = await userOf(tenant, "alice", () => limitStubs);
  const error = await rejects(alice.createChat("too big", ["b", "c", "d"]), grpc.status.RESOURCE_EXHAUSTED, "CreateChat over cap");
  void error;
  assert.equal((await alice.call("ListChats", {})).chats, []);
  const fits = await alice.createChat("fits", ["b", "c", "b"]);
  assert.is(fits.memberCount, 3);
});

// ---------------------------------------------------------------------------------------------------
// Concurrency

test("concurrency - 50 concurrent senders × 20 messages → sequences exactly 1..1000; failed sends use none", async () => {
  const tenant = uniqueTenant();
  const names = range(1, 50).map((i) => `sender-${i}`);
  const senders = await users(tenant, ...names);
  const [outsider] = await users(tenant, "outsider");
  const chat = await senders[0]!.createChat("busy", names.slice(1));
  assert.is(chat.memberCount, 50);
  let failures = 0;
  const loop = async (u: User, index: number) => {
    const out: any[] = [];
    for (let i = 0; i < 20; i++) {
      out.push(await u.send(chat.id, `${u.name}:${i}`));
      // Interleave sends that must fail without consuming a sequence.
      if (index % 10 === 0 && i % 5 === 0) {
        await rejects(u.send(chat.id, ""), grpc.status.INVALID_ARGUMENT, "empty text");
        await rejects(outsider.send(chat.id, "intruder"), grpc.status.NOT_FOUND, "non-member send");
        failures += 2;
      }
    }
    return out;
  };
  const results = await Promise.all(senders.map(loop));
  assert.ok(failures > 0);
  const returned = results.flat();
  assert.equal(seqs(returned).sort((a, b) => a - b), range(1, 1000), "returned sequences are 1..1000");
  for (const perSender of results) {
    const s = seqs(perSender);
    for (let i = 1; i < s.length; i++) assert.ok(s[i]! > s[i - 1]!, "a sender's sequences increase");
  }
  const listed = await allMessages(senders[7]!, chat.id, { order: "ORDER_OLDEST_FIRST" });
  assert.equal(seqs(listed), range(1, 1000), "stored sequences are exactly 1..1000 in order");
  assert.is(new Set(listed.map((m) => m.id)).size, 1000);
  assert.is(new Set(listed.map((m) => m.text)).size, 1000);
  assert.ok(!listed.some((m) => m.text === "intruder"));
  const bySeq = new Map(returned.map((m) => [m.sequence, m]));
  for (const m of listed) {
    assert.is(bySeq.get(m.sequence)?.id, m.id, `message ${m.sequence} listed as returned`);
    assert.ok(m.text.startsWith(`${m.senderId}:`), "sender matches text");
  }
  assert.is((await senders[3]!.getChat(chat.id)).lastSequence, "1000");
  assert.is((await senders[0]!.send(chat.id, "after")).sequence, "1001");
});

test("concurrency - failed sends consume no sequence number", async () => {
  const [alice, outsider] = await users(uniqueTenant(), "alice", "outsider");
  const chat = await alice.createChat("gaps", ["bob"]);
  assert.is((await alice.send(chat.id, "one")).sequence, "1");
  await rejects(outsider.send(chat.id, "nope"), grpc.status.NOT_FOUND, "non-member");
  await invalid(alice.send(chat.id, ""), "text", "empty");
  await invalid(alice.send(chat.id, "y".repeat(5000)), "text", "too long");
  await invalid(alice.send(chat.id, "ok", "z".repeat(65)), "client_message_id", "long key");
  await alice.call("RemoveMember", { chatId: chat.id, userId: "bob" });
  const [bob] = await users(alice.tenant, "bob");
  await rejects(bob.send(chat.id, "removed"), grpc.status.NOT_FOUND, "removed member");
  assert.is((await alice.send(chat.id, "two")).sequence, "2");
  assert.equal(seqs(await allMessages(alice, chat.id, { order: "ORDER_OLDEST_FIRST" })), [1, 2]);
});

// ---------------------------------------------------------------------------------------------------
// Durability (restarts the main server: keep last)

test("durability - chats, members, messages, read state and idempotency keys survive a restart", async () => {
  const tenant = uniqueTenant();
  const [alice, bob] = await users(tenant, "alice", "bob");
  const chat = await alice.createChat("durable", ["bob", "carol"]);
  await alice.call("AddMembers", { chatId: chat.id, userIds: ["dave"] });
  await alice.call("RemoveMember", { chatId: chat.id, userId: "carol" });
  const sent = [await alice.send(chat.id, "a1", "key-1"), await bob.send(chat.id, "b1"), await alice.send(chat.id, "a2")];
  await bob.call("MarkRead", { chatId: chat.id, sequence: 2 });
  const other = await bob.createChat("bob's");
  const beforeChat = await alice.getChat(chat.id);
  const beforeMembers = (await alice.call("ListMembers", { chatId: chat.id })).members;

  mainStubs.close();
  main = await main.restart();
  mainStubs = connect(main);

  const afterChat = await alice.getChat(chat.id);
  assert.equal(
    { ...afterChat, createTime: tsMillis(afterChat.createTime), lastMessageTime: tsMillis(afterChat.lastMessageTime) },
    { ...beforeChat, createTime: tsMillis(beforeChat.createTime), lastMessageTime: tsMillis(beforeChat.lastMessageTime) },
  );
  assert.is(afterChat.memberCount, 3);
  const afterMembers = (await alice.call("ListMembers", { chatId: chat.id })).members;
  assert.equal(afterMembers.map((m: any) => m.userId), beforeMembers.map((m: any) => m.userId));
  assert.equal(afterMembers.map((m: any) => m.addedBy), beforeMembers.map((m: any) => m.addedBy));
  assert.equal(
    afterMembers.map((m: any) => tsMillis(m.joinTime)),
    beforeMembers.map((m: any) => tsMillis(m.joinTime)),
  );
  const listed = await allMessages(alice, chat.id, { order: "ORDER_OLDEST_FIRST" });
  assert.equal(listed.map((m) => [m.id, m.sequence, m.text, m.senderId]), sent.map((m) => [m.id, m.sequence, m.text, m.senderId]));
  const b = await bob.getChat(chat.id);
  assert.is(b.readSequence, "2");
  assert.is(b.unreadCount, "1");
  assert.equal((await bob.call("ListChats", {})).chats.map((c: any) => c.id), [other.id, chat.id]);
  const [carol] = await users(tenant, "carol");
  await rejects(carol.getChat(chat.id), grpc.status.NOT_FOUND, "removed member stays removed");
  // The idempotency key still returns the original; sequences continue without gap.
  const retry = await alice.send(chat.id, "a1", "key-1");
  assert.is(retry.id, sent[0].id);
  assert.is(retry.sequence, "1");
  assert.is((await alice.send(chat.id, "a3")).sequence, "4");
});

test.run();

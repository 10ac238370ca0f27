// MessageStore on its own, against the test database: what a send statement does when PostgreSQL
// cancels it for a reason that is not the caller's, and what happens to a send abandoned in the queue.
import { test } from "uvu";
import * as assert from "uvu/assert";
import type { Cancellable, Database } from "../src/store/database.js";
import { MessageStore } from "../src/store/message-store.js";
import { uniqueTenant, useStoreTestDatabase } from "./support/server.js";

let db: Database;
useStoreTestDatabase(test, (opened) => (db = opened));

async function chatWithMember(tenant: string, user: string): Promise<string> {
  const id = crypto.randomUUID();
  await db.sql`INSERT INTO chats (tenant_id, id, name, creator_id, create_time, activity_time, member_count)
    VALUES (${tenant}, ${id}, 'store test', ${user}, now(), now(), 1)`;
  await db.sql`INSERT INTO members (tenant_id, chat_id, user_id, join_time, added_by) VALUES (${tenant}, ${id}, ${user}, now(), ${user})`;
  return id;
}

/** The real cancellable, except that its first call fails as PostgreSQL would with this error. */
function failingOnce(error: Error & { code: string }): { cancellable: Cancellable; calls: () => number } {
  let calls = 0;
  const cancellable: Cancellable = (query, signal) => {
    calls++;
    // postgres.js queries run when first awaited: this one never reaches the database.
    if (calls === 1) return Promise.reject(error);
    return db.cancellable(query, signal);
  };
  return { cancellable, calls: () => calls };
}

function pgError(code: string, message: string): Error & { code: string } {
  return Object.assign(new Error(message), { code });
}

test("store - a send cancelled by a stray cancel request (meant for the statement before) is run again and stored once", async () => {
  const tenant = uniqueTenant("store");
  const chatId = await chatWithMember(tenant, "alice");
  const { cancellable, calls } = failingOnce(pgError("57014", "canceling statement due to user request"));
  const store = new MessageStore({ sql: db.sql, cancellable });
  const { message } = await store.send(tenant, chatId, crypto.randomUUID(), "alice", "hello", "");
  assert.is(message.sequence, 1n);
  assert.is(calls(), 2, "the statement ran again");
  const rows = await db.sql`SELECT sequence FROM messages WHERE tenant_id = ${tenant} AND chat_id = ${chatId}`;
  assert.equal(rows.map((r) => Number(r.sequence)), [1]);
});

test("store - a statement_timeout is not run again: the send fails", async () => {
  const tenant = uniqueTenant("store");
  const chatId = await chatWithMember(tenant, "alice");
  const timeout = pgError("57014", "canceling statement due to statement timeout");
  const { cancellable, calls } = failingOnce(timeout);
  const store = new MessageStore({ sql: db.sql, cancellable });
  try {
    await store.send(tenant, chatId, crypto.randomUUID(), "alice", "hello", "");
    assert.unreachable("the send should fail");
  } catch (error) {
    assert.is(error, timeout);
  }
  assert.is(calls(), 1);
  const rows = await db.sql`SELECT 1 FROM messages WHERE tenant_id = ${tenant}`;
  assert.is(rows.length, 0);
});

test("store - a send abandoned while it waits for the running statement is never stored and takes no number", async () => {
  const tenant = uniqueTenant("store");
  const chatId = await chatWithMember(tenant, "alice");
  // The first statement is held until released, so the next send has to wait in the queue.
  let release!: () => void;
  const held = new Promise<void>((resolve) => (release = resolve));
  let calls = 0;
  const cancellable: Cancellable = async (query, signal) => {
    if (++calls === 1) await held;
    return db.cancellable(query, signal);
  };
  const store = new MessageStore({ sql: db.sql, cancellable });
  const first = store.send(tenant, chatId, crypto.randomUUID(), "alice", "first", "");
  const abandonedId = crypto.randomUUID();
  const caller = new AbortController();
  const abandoned = store.send(tenant, chatId, abandonedId, "alice", "abandoned", "", caller.signal);
  const reason = new Error("deadline exceeded");
  caller.abort(reason);
  try {
    await abandoned;
    assert.unreachable("the abandoned send should fail");
  } catch (error) {
    assert.is(error, reason);
  }
  release();
  assert.is((await first).message.sequence, 1n);
  assert.is((await store.send(tenant, chatId, crypto.randomUUID(), "alice", "third", "")).message.sequence, 2n);
  const rows = await db.sql`SELECT id, sequence FROM messages WHERE tenant_id = ${tenant} AND chat_id = ${chatId} ORDER BY sequence`;
  assert.equal(rows.map((r) => Number(r.sequence)), [1, 2]);
  assert.not.ok(rows.some((r) => r.id === abandonedId), "the abandoned message is not stored");
});

test.run();

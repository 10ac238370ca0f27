import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { MessageSchema, type Message } from "../../gen/parley/v1/message_pb.js";
import { NotFoundError } from "../errors.js";
import { Store } from "./database.js";

export interface MessageQuery {
  /** Inclusive, ISO time. */
  startTime?: Date;
  /** Exclusive. */
  endTime?: Date;
  /** Exclusive lower bound; 0n for none. */
  afterSequence: bigint;
  /** Exclusive upper bound; 0n for none. */
  beforeSequence: bigint;
  newestFirst: boolean;
  /** Only if this user is a member of the chat (no rows otherwise): saves a round trip. */
  visibleTo?: string;
}

export interface SendResult {
  message: Message;
  /** True when client_message_id matched an earlier send: nothing new was stored. */
  duplicate: boolean;
}

export class MessageStore extends Store {
  /**
   * Stores a message with the chat's next sequence, in one statement (one round trip). The chat row
   * lock (FOR UPDATE) orders concurrent senders: a waiting sender re-reads the row after the lock is
   * released and gets the next number, and a statement that fails changes nothing, so sequences stay
   * 1..N without gaps. A repeated client_message_id hits the unique index and inserts nothing.
   */
  async send(tenant: string, chatId: string, messageId: string, sender: string, text: string, clientMessageId: string, signal?: AbortSignal): Promise<SendResult> {
    const cmid = clientMessageId === "" ? null : clientMessageId;
    const [row] = await this.cancellable(this.sql`
      WITH chat AS (
        SELECT c.last_sequence, c.last_message_time FROM chats c
        JOIN members m ON m.tenant_id = c.tenant_id AND m.chat_id = c.id AND m.user_id = ${sender}
        WHERE c.tenant_id = ${tenant} AND c.id = ${chatId}
        FOR UPDATE OF c
      ), inserted AS (
        -- Never earlier than the previous message, so time order equals sequence order within a chat.
        INSERT INTO messages (tenant_id, chat_id, sequence, id, sender_id, text, create_time, client_message_id)
        SELECT ${tenant}, ${chatId}, chat.last_sequence + 1, ${messageId}, ${sender}, ${text},
               greatest(date_trunc('milliseconds', clock_timestamp()), chat.last_message_time), ${cmid}
        FROM chat
        ON CONFLICT (tenant_id, chat_id, sender_id, client_message_id) WHERE client_message_id IS NOT NULL DO NOTHING
        RETURNING *
      ), chat_update AS (
        UPDATE chats c SET last_sequence = i.sequence, last_message_time = i.create_time, activity_time = i.create_time
        FROM inserted i WHERE c.tenant_id = ${tenant} AND c.id = ${chatId}
      ), read_update AS (
        UPDATE members m SET read_sequence = i.sequence
        FROM inserted i WHERE m.tenant_id = ${tenant} AND m.chat_id = ${chatId} AND m.user_id = ${sender}
      )
      SELECT * FROM inserted`, signal);
    if (row) return { message: toMessage(row), duplicate: false };
    // Nothing inserted: either the sender is not a member, or this is a retry of an earlier send.
    if (cmid !== null) {
      const [earlier] = await this.cancellable(this.sql`
        SELECT msg.* FROM messages msg
        JOIN members m ON m.tenant_id = msg.tenant_id AND m.chat_id = msg.chat_id AND m.user_id = ${sender}
        WHERE msg.tenant_id = ${tenant} AND msg.chat_id = ${chatId}
          AND msg.sender_id = ${sender} AND msg.client_message_id = ${cmid}`, signal);
      if (earlier) return { message: toMessage(earlier), duplicate: true };
    }
    throw new NotFoundError("chat");
  }

  /** The message, if the reader is a member of its chat. */
  async get(tenant: string, reader: string, chatId: string, messageId: string, signal?: AbortSignal): Promise<Message | undefined> {
    const [row] = await this.cancellable(this.sql`
      SELECT * FROM messages WHERE tenant_id = ${tenant} AND id = ${messageId} AND chat_id = ${chatId}
        AND EXISTS (SELECT 1 FROM members m WHERE m.tenant_id = ${tenant} AND m.chat_id = ${chatId} AND m.user_id = ${reader})`, signal);
    return row && toMessage(row);
  }

  /** One page of history (limit + 1 rows are read to know whether more follow). */
  async list(tenant: string, chatId: string, query: MessageQuery, limit: number, signal?: AbortSignal): Promise<Message[]> {
    const sql = this.sql;
    const rows = await this.cancellable(sql`
      SELECT * FROM messages
      WHERE tenant_id = ${tenant} AND chat_id = ${chatId}
      ${query.afterSequence > 0n ? sql`AND sequence > ${query.afterSequence.toString()}` : sql``}
      ${query.beforeSequence > 0n ? sql`AND sequence < ${query.beforeSequence.toString()}` : sql``}
      ${query.startTime ? sql`AND create_time >= ${query.startTime}` : sql``}
      ${query.endTime ? sql`AND create_time < ${query.endTime}` : sql``}
      ${query.visibleTo === undefined ? sql`` : sql`AND EXISTS (SELECT 1 FROM members m
        WHERE m.tenant_id = ${tenant} AND m.chat_id = ${chatId} AND m.user_id = ${query.visibleTo})`}
      ORDER BY sequence ${query.newestFirst ? sql`DESC` : sql`ASC`}
      LIMIT ${limit}`, signal);
    return rows.map(toMessage);
  }
}

export function toMessage(row: Record<string, unknown>): Message {
  return create(MessageSchema, {
    id: row.id as string,
    chatId: row.chat_id as string,
    senderId: row.sender_id as string,
    text: row.text as string,
    sequence: row.sequence as bigint,
    createTime: timestampFromDate(row.create_time as Date),
    clientMessageId: (row.client_message_id as string | null) ?? "",
  });
}

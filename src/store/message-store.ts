import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { MessageSchema, type Message } from "../../gen/parley/v1/message_pb.js";
import { NotFoundError } from "../errors.js";
import type { Sql } from "./database.js";

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
}

export interface SendResult {
  message: Message;
  /** True when client_message_id matched an earlier send: nothing new was stored. */
  duplicate: boolean;
}

export class MessageStore {
  constructor(private readonly sql: Sql) {}

  /**
   * Stores a message with the chat's next sequence. The chat row lock orders concurrent senders, and a
   * failed transaction rolls the counter back, so sequences stay 1..N without gaps.
   */
  async send(tenant: string, chatId: string, messageId: string, sender: string, text: string, clientMessageId: string): Promise<SendResult> {
    return this.sql.begin(async (tx) => {
      const [chat] = await tx`
        SELECT c.last_sequence, c.last_message_time FROM chats c
        JOIN members m ON m.tenant_id = c.tenant_id AND m.chat_id = c.id AND m.user_id = ${sender}
        WHERE c.tenant_id = ${tenant} AND c.id = ${chatId}
        FOR UPDATE OF c`;
      if (!chat) throw new NotFoundError("chat");
      if (clientMessageId !== "") {
        const [earlier] = await tx`
          SELECT * FROM messages WHERE tenant_id = ${tenant} AND chat_id = ${chatId}
            AND sender_id = ${sender} AND client_message_id = ${clientMessageId}`;
        if (earlier) return { message: toMessage(earlier), duplicate: true };
      }
      const sequence = (chat.last_sequence as bigint) + 1n;
      // Never earlier than the previous message, so time order equals sequence order within a chat.
      const [row] = await tx`
        INSERT INTO messages (tenant_id, chat_id, sequence, id, sender_id, text, create_time, client_message_id)
        VALUES (${tenant}, ${chatId}, ${sequence.toString()}, ${messageId}, ${sender}, ${text},
                greatest(date_trunc('milliseconds', clock_timestamp()), ${chat.last_message_time}::timestamptz),
                ${clientMessageId === "" ? null : clientMessageId})
        RETURNING *`;
      await tx`
        UPDATE chats SET last_sequence = ${sequence.toString()}, last_message_time = ${row!.create_time},
          activity_time = ${row!.create_time}
        WHERE tenant_id = ${tenant} AND id = ${chatId}`;
      await tx`
        UPDATE members SET read_sequence = ${sequence.toString()}
        WHERE tenant_id = ${tenant} AND chat_id = ${chatId} AND user_id = ${sender}`;
      return { message: toMessage(row!), duplicate: false };
    });
  }

  async get(tenant: string, chatId: string, messageId: string): Promise<Message | undefined> {
    const [row] = await this.sql`
      SELECT * FROM messages WHERE tenant_id = ${tenant} AND id = ${messageId} AND chat_id = ${chatId}`;
    return row && toMessage(row);
  }

  /** One page of history (limit + 1 rows are read to know whether more follow). */
  async list(tenant: string, chatId: string, query: MessageQuery, limit: number): Promise<Message[]> {
    const sql = this.sql;
    const rows = await sql`
      SELECT * FROM messages
      WHERE tenant_id = ${tenant} AND chat_id = ${chatId}
      ${query.afterSequence > 0n ? sql`AND sequence > ${query.afterSequence.toString()}` : sql``}
      ${query.beforeSequence > 0n ? sql`AND sequence < ${query.beforeSequence.toString()}` : sql``}
      ${query.startTime ? sql`AND create_time >= ${query.startTime}` : sql``}
      ${query.endTime ? sql`AND create_time < ${query.endTime}` : sql``}
      ORDER BY sequence ${query.newestFirst ? sql`DESC` : sql`ASC`}
      LIMIT ${limit}`;
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

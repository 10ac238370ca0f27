import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { ChatSchema, type Chat } from "../../gen/parley/v1/chat_pb.js";
import { MemberSchema, type Member } from "../../gen/parley/v1/member_pb.js";
import { Store } from "./database.js";

/** Keyset position in a user's chat list: most recent activity first. */
export interface ChatCursor {
  activityTime: string;
  chatId: string;
}

export interface ChatPage {
  chats: Chat[];
  next: ChatCursor | undefined;
}

// Truncated to milliseconds so a time returned to a client compares exactly with the stored one.
const NOW = "date_trunc('milliseconds', clock_timestamp())";

export class ChatStore extends Store {
  /** Creates the chat with the creator first, then the other members in the order given. */
  async create(tenant: string, chatId: string, creator: string, name: string, memberIds: string[], signal?: AbortSignal) {
    const userIds = [...new Set([creator, ...memberIds])];
    return this.sql.begin(async (tx) => {
      const [row] = await this.cancellable(tx`
        INSERT INTO chats (tenant_id, id, name, creator_id, create_time, member_count, activity_time)
        VALUES (${tenant}, ${chatId}, ${name}, ${creator}, ${tx.unsafe(NOW)}, ${userIds.length}, ${tx.unsafe(NOW)})
        RETURNING *`, signal);
      const memberRows = await this.cancellable(tx`
        INSERT INTO members (tenant_id, chat_id, user_id, join_time, added_by)
        SELECT ${tenant}, ${chatId}, u.user_id, ${row!.create_time}, ${creator}
        FROM unnest(${tx.array(userIds)}::text[]) WITH ORDINALITY AS u(user_id, position)
        ORDER BY u.position
        RETURNING user_id, join_time, added_by`, signal);
      return { chat: toChat(row!, 0n), members: memberRows.map(toMember) };
    });
  }

  /** The chat as the caller sees it, or undefined when it does not exist or the caller is not a member. */
  async get(tenant: string, user: string, chatId: string, signal?: AbortSignal): Promise<Chat | undefined> {
    const [row] = await this.cancellable(this.sql`
      SELECT c.*, m.read_sequence FROM chats c
      JOIN members m ON m.tenant_id = c.tenant_id AND m.chat_id = c.id AND m.user_id = ${user}
      WHERE c.tenant_id = ${tenant} AND c.id = ${chatId}`, signal);
    return row && toChat(row, row.read_sequence as bigint);
  }

  async list(tenant: string, user: string, after: ChatCursor | undefined, limit: number, signal?: AbortSignal): Promise<ChatPage> {
    const rows = await this.cancellable(this.sql`
      SELECT c.*, m.read_sequence FROM members m
      JOIN chats c ON c.tenant_id = m.tenant_id AND c.id = m.chat_id
      WHERE m.tenant_id = ${tenant} AND m.user_id = ${user}
      ${after ? this.sql`AND (c.activity_time, c.id) < (${after.activityTime}::timestamptz, ${after.chatId}::uuid)` : this.sql``}
      ORDER BY c.activity_time DESC, c.id DESC
      LIMIT ${limit + 1}`, signal);
    const page = rows.slice(0, limit);
    const last = page.at(-1);
    return {
      chats: page.map((r) => toChat(r, r.read_sequence as bigint)),
      next:
        rows.length > limit && last
          ? { activityTime: (last.activity_time as Date).toISOString(), chatId: last.id as string }
          : undefined,
    };
  }

  /** The chat with the caller's new read marker, and whether the marker moved; undefined for a non-member. */
  async markRead(tenant: string, user: string, chatId: string, sequence: bigint, signal?: AbortSignal): Promise<{ chat: Chat; moved: boolean } | undefined> {
    // The row is locked before it is read, so of two concurrent calls only one sees the marker move.
    const [row] = await this.cancellable(this.sql`
      WITH before AS (
        SELECT read_sequence FROM members WHERE tenant_id = ${tenant} AND chat_id = ${chatId} AND user_id = ${user} FOR UPDATE
      )
      UPDATE members m SET read_sequence = greatest(m.read_sequence, least(${sequence.toString()}::bigint, c.last_sequence))
      FROM chats c, before b
      WHERE m.tenant_id = ${tenant} AND m.chat_id = ${chatId} AND m.user_id = ${user}
        AND c.tenant_id = m.tenant_id AND c.id = m.chat_id
      RETURNING c.*, m.read_sequence, b.read_sequence AS read_sequence_before`, signal);
    if (!row) return undefined;
    return { chat: toChat(row, row.read_sequence as bigint), moved: row.read_sequence !== row.read_sequence_before };
  }
}

export function toChat(row: Record<string, unknown>, readSequence: bigint): Chat {
  const lastSequence = row.last_sequence as bigint;
  return create(ChatSchema, {
    id: row.id as string,
    name: row.name as string,
    createTime: timestampFromDate(row.create_time as Date),
    memberCount: row.member_count as number,
    creatorId: row.creator_id as string,
    lastSequence,
    lastMessageTime: row.last_message_time ? timestampFromDate(row.last_message_time as Date) : undefined,
    readSequence,
    unreadCount: lastSequence - readSequence,
  });
}

export function toMember(row: Record<string, unknown>): Member {
  return create(MemberSchema, {
    userId: row.user_id as string,
    joinTime: timestampFromDate(row.join_time as Date),
    addedBy: row.added_by as string,
  });
}

import type { Member } from "../../gen/parley/v1/member_pb.js";
import { NotFoundError, ResourceExhaustedError } from "../errors.js";
import { toMember } from "./chat-store.js";
import { Store } from "./database.js";

export interface MemberPage {
  members: Member[];
  /** join_seq of the last member returned, when more follow. */
  next: bigint | undefined;
}

const CHAT = "chat";

export class MemberStore extends Store {
  async isMember(tenant: string, chatId: string, user: string, signal?: AbortSignal): Promise<boolean> {
    const rows = await this.cancellable(this.sql`
      SELECT 1 FROM members WHERE tenant_id = ${tenant} AND chat_id = ${chatId} AND user_id = ${user}`, signal);
    return rows.length > 0;
  }

  /** Members in join order; NotFoundError unless the caller is a member. */
  async list(tenant: string, caller: string, chatId: string, after: bigint, limit: number, signal?: AbortSignal): Promise<MemberPage> {
    const rows = await this.cancellable(this.sql`
      SELECT m.user_id, m.join_time, m.added_by, m.join_seq FROM members m
      WHERE m.tenant_id = ${tenant} AND m.chat_id = ${chatId} AND m.join_seq > ${after.toString()}
        AND EXISTS (SELECT 1 FROM members me
                    WHERE me.tenant_id = ${tenant} AND me.chat_id = ${chatId} AND me.user_id = ${caller})
      ORDER BY m.join_seq
      LIMIT ${limit + 1}`, signal);
    if (rows.length === 0 && !(await this.isMember(tenant, chatId, caller, signal))) throw new NotFoundError(CHAT);
    const page = rows.slice(0, limit);
    return {
      members: page.map(toMember),
      next: rows.length > limit ? (page.at(-1)!.join_seq as bigint) : undefined,
    };
  }

  /** Adds the users who are not members yet (new members start with nothing unread); returns them. */
  async add(tenant: string, caller: string, chatId: string, userIds: string[], maxMembers: number, signal?: AbortSignal): Promise<Member[]> {
    return this.sql.begin(async (tx) => {
      const [chat] = await this.cancellable(tx`
        SELECT c.member_count, c.last_sequence FROM chats c
        JOIN members m ON m.tenant_id = c.tenant_id AND m.chat_id = c.id AND m.user_id = ${caller}
        WHERE c.tenant_id = ${tenant} AND c.id = ${chatId}
        FOR UPDATE OF c`, signal);
      if (!chat) throw new NotFoundError(CHAT);
      const added = await this.cancellable(tx`
        INSERT INTO members (tenant_id, chat_id, user_id, join_time, added_by, read_sequence)
        SELECT ${tenant}, ${chatId}, u.user_id, date_trunc('milliseconds', clock_timestamp()), ${caller}, ${chat.last_sequence}
        FROM unnest(${tx.array(userIds)}::text[]) WITH ORDINALITY AS u(user_id, position)
        ORDER BY u.position
        ON CONFLICT (tenant_id, chat_id, user_id) DO NOTHING
        RETURNING user_id, join_time, added_by`, signal);
      const count = (chat.member_count as number) + added.length;
      if (count > maxMembers) {
        throw new ResourceExhaustedError(`a chat has at most ${maxMembers} members`);
      }
      if (added.length > 0) {
        await this.cancellable(tx`UPDATE chats SET member_count = ${count} WHERE tenant_id = ${tenant} AND id = ${chatId}`, signal);
      }
      return added.map(toMember);
    });
  }

  /** Removes a member; NotFoundError when the caller or the user is not a member. */
  async remove(tenant: string, caller: string, chatId: string, userId: string, signal?: AbortSignal): Promise<void> {
    await this.sql.begin(async (tx) => {
      const [chat] = await this.cancellable(tx`
        SELECT 1 FROM chats c
        JOIN members m ON m.tenant_id = c.tenant_id AND m.chat_id = c.id AND m.user_id = ${caller}
        WHERE c.tenant_id = ${tenant} AND c.id = ${chatId}
        FOR UPDATE OF c`, signal);
      if (!chat) throw new NotFoundError(CHAT);
      const removed = await this.cancellable(tx`
        DELETE FROM members WHERE tenant_id = ${tenant} AND chat_id = ${chatId} AND user_id = ${userId}
        RETURNING 1`, signal);
      if (removed.length === 0) throw new NotFoundError("member");
      await this.cancellable(tx`UPDATE chats SET member_count = member_count - 1 WHERE tenant_id = ${tenant} AND id = ${chatId}`, signal);
    });
  }

  /** Ids of every chat the user belongs to (the subscription set of a notification stream). */
  async chatIdsOf(tenant: string, user: string, signal?: AbortSignal): Promise<string[]> {
    const rows = await this.cancellable(this.sql`SELECT chat_id FROM members WHERE tenant_id = ${tenant} AND user_id = ${user}`, signal);
    return rows.map((r) => r.chat_id as string);
  }
}

import { create } from "@bufbuild/protobuf";
import {
  AddMembersResponseSchema, ListMembersResponseSchema, RemoveMemberResponseSchema,
  type AddMembersRequest, type ListMembersRequest, type RemoveMemberRequest,
} from "../../gen/parley/v1/member_pb.js";
import type { Caller } from "../auth/caller.js";
import type { MemberStore } from "../store/member-store.js";
import type { Events } from "./events.js";
import type { PageTokens } from "./page-token.js";
import { RequestCheck } from "./validate.js";

export class Members {
  constructor(
    private readonly store: MemberStore,
    private readonly events: Events,
    private readonly pageTokens: PageTokens,
    private readonly maxMembers: number,
  ) {}

  async listMembers(caller: Caller, req: ListMembersRequest) {
    const check = new RequestCheck();
    const chatId = check.id("chat_id", req.chatId);
    const pageSize = check.pageSize(req.pageSize);
    check.done();
    const binding = ["ListMembers", chatId];
    const position = this.pageTokens.decode(caller.tenantId, binding, req.pageToken);
    const after = position ? BigInt(position[0]!) : 0n;
    const page = await this.store.list(caller.tenantId, caller.userId, chatId, after, pageSize, caller.signal);
    return create(ListMembersResponseSchema, {
      members: page.members,
      nextPageToken: page.next === undefined ? "" : this.pageTokens.encode(caller.tenantId, binding, [page.next]),
    });
  }

  async addMembers(caller: Caller, req: AddMembersRequest) {
    const check = new RequestCheck();
    const chatId = check.id("chat_id", req.chatId);
    const userIds = check.userIds("user_ids", req.userIds);
    if (userIds.length === 0) check.fail("user_ids", "required");
    check.done();
    const added = await this.store.add(caller.tenantId, caller.userId, chatId, [...new Set(userIds)], this.maxMembers, caller.signal);
    await this.events.membersAdded(caller.tenantId, chatId, added.map((m) => m.userId), caller.userId);
    return create(AddMembersResponseSchema, { added });
  }

  async removeMember(caller: Caller, req: RemoveMemberRequest) {
    const check = new RequestCheck();
    const chatId = check.id("chat_id", req.chatId);
    const userId = check.userId("user_id", req.userId);
    check.done();
    await this.store.remove(caller.tenantId, caller.userId, chatId, userId, caller.signal);
    await this.events.memberRemoved(caller.tenantId, chatId, userId, caller.userId);
    return create(RemoveMemberResponseSchema, {});
  }
}

import { create } from "@bufbuild/protobuf";
import { newId } from "../ids.js";
import {
  CreateChatResponseSchema, GetChatResponseSchema, ListChatsResponseSchema, MarkReadResponseSchema,
  type CreateChatRequest, type GetChatRequest, type ListChatsRequest, type MarkReadRequest,
} from "../../gen/parley/v1/chat_pb.js";
import type { Caller } from "../auth/caller.js";
import { NotFoundError, ResourceExhaustedError } from "../errors.js";
import type { ChatStore } from "../store/chat-store.js";
import type { Events } from "./events.js";
import type { PageTokens } from "./page-token.js";
import { MAX_NAME_LENGTH, RequestCheck } from "./validate.js";

export class Chats {
  constructor(
    private readonly store: ChatStore,
    private readonly events: Events,
    private readonly pageTokens: PageTokens,
    private readonly maxMembers: number,
  ) {}

  async createChat(caller: Caller, req: CreateChatRequest) {
    const check = new RequestCheck();
    const name = check.text("name", req.name, { min: 0, max: MAX_NAME_LENGTH });
    const memberIds = check.userIds("member_ids", req.memberIds);
    check.done();
    const userIds = [...new Set([caller.userId, ...memberIds])];
    if (userIds.length > this.maxMembers) throw new ResourceExhaustedError(`a chat has at most ${this.maxMembers} members`);
    const { chat } = await this.store.create(caller.tenantId, newId(), caller.userId, name, userIds, caller.signal);
    await this.events.chatCreated(caller.tenantId, chat.id, chat.name, caller.userId, userIds);
    return create(CreateChatResponseSchema, { chat });
  }

  async listChats(caller: Caller, req: ListChatsRequest) {
    const check = new RequestCheck();
    const pageSize = check.pageSize(req.pageSize);
    check.done();
    const binding = ["ListChats", caller.userId];
    const position = this.pageTokens.decode(caller.tenantId, binding, req.pageToken);
    const after = position && { activityTime: position[0]!, chatId: position[1]! };
    const page = await this.store.list(caller.tenantId, caller.userId, after, pageSize, caller.signal);
    return create(ListChatsResponseSchema, {
      chats: page.chats,
      nextPageToken: page.next
        ? this.pageTokens.encode(caller.tenantId, binding, [page.next.activityTime, page.next.chatId])
        : "",
    });
  }

  async getChat(caller: Caller, req: GetChatRequest) {
    const check = new RequestCheck();
    const chatId = check.id("chat_id", req.chatId);
    check.done();
    const chat = await this.store.get(caller.tenantId, caller.userId, chatId, caller.signal);
    if (!chat) throw new NotFoundError("chat");
    return create(GetChatResponseSchema, { chat });
  }

  async markRead(caller: Caller, req: MarkReadRequest) {
    const check = new RequestCheck();
    const chatId = check.id("chat_id", req.chatId);
    const sequence = check.sequence("sequence", req.sequence);
    check.done();
    const marked = await this.store.markRead(caller.tenantId, caller.userId, chatId, sequence, caller.signal);
    if (!marked) throw new NotFoundError("chat");
    const { chat, moved } = marked;
    if (moved) await this.events.readUpdated(caller.tenantId, caller.userId, chatId, chat.readSequence);
    return create(MarkReadResponseSchema, { chat });
  }
}

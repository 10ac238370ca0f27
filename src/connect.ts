import type { ConnectRouter, HandlerContext } from "@connectrpc/connect";
import { ChatService } from "../gen/parley/v1/chat_pb.js";
import { MemberService } from "../gen/parley/v1/member_pb.js";
import { MessageSchema, MessageService } from "../gen/parley/v1/message_pb.js";
import { NotificationSchema, NotificationService } from "../gen/parley/v1/notification_pb.js";
import { callerKey, type Caller } from "./auth/caller.js";
import type { Chats } from "./services/chats.js";
import type { Members } from "./services/members.js";
import type { Messages } from "./services/messages.js";
import type { Notifications } from "./services/notifications.js";
import { streamOutput } from "./transport/stream-output.js";

export interface ParleyServices {
  chats: Chats;
  members: Members;
  messages: Messages;
  notifications: Notifications;
}

export const parleyServices = [ChatService, MemberService, MessageService, NotificationService];

/** The authentication interceptor has put the caller into the context of every Parley RPC. */
function caller(ctx: HandlerContext): Caller {
  const value = ctx.values.get(callerKey);
  if (!value) throw new Error("no authenticated caller in context");
  return value;
}

/** Registers every Parley service: thin adapters from Connect to the transport-independent services. */
export function registerParley(router: ConnectRouter, s: ParleyServices): void {
  router.service(ChatService, {
    createChat: (req, ctx) => s.chats.createChat(caller(ctx), req),
    listChats: (req, ctx) => s.chats.listChats(caller(ctx), req),
    getChat: (req, ctx) => s.chats.getChat(caller(ctx), req),
    markRead: (req, ctx) => s.chats.markRead(caller(ctx), req),
  });
  router.service(MemberService, {
    listMembers: (req, ctx) => s.members.listMembers(caller(ctx), req),
    addMembers: (req, ctx) => s.members.addMembers(caller(ctx), req),
    removeMember: (req, ctx) => s.members.removeMember(caller(ctx), req),
  });
  router.service(MessageService, {
    sendMessage: (req, ctx) => s.messages.sendMessage(caller(ctx), req),
    listMessages: (req, ctx) => s.messages.listMessages(caller(ctx), req),
    getMessage: (req, ctx) => s.messages.getMessage(caller(ctx), req),
    watchMessages: (req, ctx) => s.messages.watchMessages(caller(ctx), req, ctx.signal, streamOutput(ctx, MessageSchema)),
  });
  router.service(NotificationService, {
    subscribe: (req, ctx) => s.notifications.subscribe(caller(ctx), req, ctx.signal, streamOutput(ctx, NotificationSchema)),
  });
}

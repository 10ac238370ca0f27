// The Parley demo: one page, plain TypeScript, Connect-Web (Connect protocol) against the server that
// served it. Unary RPCs for everything the user does; NotificationService.Subscribe for live updates.
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import type { Chat } from "../../gen/parley/v1/chat_pb.js";
import type { Member } from "../../gen/parley/v1/member_pb.js";
import { Order, type Message } from "../../gen/parley/v1/message_pb.js";
import type { Notification } from "../../gen/parley/v1/notification_pb.js";
import { createApi, errorText, isUnauthenticated, type Api } from "./api.js";
import { byId, h, randomId } from "./dom.js";
import { clearSession, devToken, devTokensAvailable, saveSession, sessionFromToken, takeToken, type Session } from "./session.js";

const PAGE_SIZE = 30;
const CATCH_UP_PAGE_SIZE = 200;

interface OpenChat {
  id: string;
  /** By sequence: live events and pages may overlap. */
  messages: Map<bigint, Message>;
  /** Page token for older messages; "" once the oldest is shown. */
  olderPageToken: string;
  members: Member[];
  moreMembers: boolean;
}

interface SignedIn {
  session: Session;
  api: Api;
  /** Ends the notification stream on sign-out. */
  stop: AbortController;
  chats: Map<string, Chat>;
  moreChatsToken: string;
  open: OpenChat | undefined;
}

let current: SignedIn | undefined;

const input = (id: string) => byId<HTMLInputElement>(id);
const el = {
  status: byId("status"),
  whoami: byId("whoami"),
  signOut: byId<HTMLButtonElement>("sign-out"),
  error: byId("error"),
  signin: byId("signin"),
  devSignin: byId<HTMLFormElement>("dev-signin"),
  tokenSignin: byId<HTMLFormElement>("token-signin"),
  app: byId("app"),
  newChat: byId<HTMLFormElement>("new-chat"),
  chats: byId("chats"),
  moreChats: byId<HTMLButtonElement>("more-chats"),
  chat: byId("chat"),
  noChat: byId("no-chat"),
  chatName: byId("chat-name"),
  memberCount: byId("member-count"),
  members: byId("members"),
  addMember: byId<HTMLFormElement>("add-member"),
  messages: byId("messages"),
  messageList: byId("message-list"),
  loadOlder: byId<HTMLButtonElement>("load-older"),
  composer: byId<HTMLFormElement>("composer"),
};

// ---- signing in and out

function signIn(token: string): void {
  const session = sessionFromToken(token);
  saveSession(session);
  const s: SignedIn = {
    session,
    api: createApi(token),
    stop: new AbortController(),
    chats: new Map(),
    moreChatsToken: "",
    open: undefined,
  };
  current = s;
  el.whoami.textContent = `${session.user} @ ${session.tenant}`;
  el.signOut.hidden = false;
  el.signin.hidden = true;
  el.app.hidden = false;
  renderChats();
  renderChat();
  void follow(s);
}

function signOut(reason?: string): void {
  current?.stop.abort();
  current = undefined;
  clearSession();
  el.whoami.textContent = "";
  el.signOut.hidden = true;
  setStatus("offline");
  if (reason) showError(reason);
  void showSignIn();
}

async function showSignIn(): Promise<void> {
  el.app.hidden = true;
  el.signin.hidden = false;
  el.devSignin.hidden = !(await devTokensAvailable());
}

// ---- live updates

/** Subscribe until sign-out; after every (re)connect, Ready, then catch up: nothing is missed. */
async function follow(s: SignedIn): Promise<void> {
  const signal = s.stop.signal;
  let delayMs = 500;
  while (!signal.aborted) {
    setStatus("connecting");
    try {
      for await (const n of s.api.notifications.subscribe({ includeMessages: true }, { signal })) {
        if (n.event.case === "ready") {
          delayMs = 500;
          await resync(s);
          setStatus("live");
        } else {
          onNotification(s, n);
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      if (isUnauthenticated(error)) return signOut(`signed out: ${errorText(error)}`);
    }
    if (signal.aborted) return;
    setStatus("offline");
    await new Promise((resolve) => setTimeout(resolve, delayMs));
    delayMs = Math.min(delayMs * 2, 10_000);
  }
}

async function resync(s: SignedIn): Promise<void> {
  await refreshChats(s);
  const open = s.open;
  if (open) await Promise.all([catchUp(s, open), loadMembers(s, open)]);
}

function onNotification(s: SignedIn, n: Notification): void {
  const event = n.event;
  switch (event.case) {
    case "messageCreated": {
      const { chatId, sequence, senderId, message } = event.value;
      onMessage(s, chatId, sequence, senderId, message, n.time);
      break;
    }
    case "readUpdated": {
      const chat = s.chats.get(event.value.chatId);
      if (chat) setRead(chat, event.value.readSequence);
      renderChats();
      break;
    }
    case "chatCreated":
    case "memberAdded":
      scheduleRefresh(s);
      if (s.open?.id === event.value.chatId) void loadMembers(s, s.open).catch(report);
      break;
    case "memberRemoved":
      if (event.value.userId === s.session.user) {
        s.chats.delete(event.value.chatId);
        if (s.open?.id === event.value.chatId) closeChat(s);
        renderChats();
      } else {
        scheduleRefresh(s);
        if (s.open?.id === event.value.chatId) void loadMembers(s, s.open).catch(report);
      }
      break;
    default:
      break; // heartbeats
  }
}

function onMessage(s: SignedIn, chatId: string, sequence: bigint, senderId: string, message: Message | undefined, time: Timestamp | undefined): void {
  const chat = s.chats.get(chatId);
  if (!chat) return scheduleRefresh(s);
  if (sequence > chat.lastSequence) {
    chat.lastSequence = sequence;
    chat.lastMessageTime = message?.createTime ?? time;
  }
  const open = s.open?.id === chatId ? s.open : undefined;
  if (senderId === s.session.user) {
    setRead(chat, sequence); // sending marks the chat read for the sender
  } else if (open) {
    setRead(chat, sequence);
    markRead(s, chatId, sequence);
  } else {
    setRead(chat, chat.readSequence);
  }
  renderChats();
  if (!open) return;
  const gap = open.messages.size > 0 && sequence > newestSequence(open) + 1n;
  if (message) addMessages(s, open, [message], senderId === s.session.user ? "bottom" : "follow");
  if (gap || !message) void catchUp(s, open).catch(report);
}

/** read_sequence = max(current, min(sequence, last_sequence)), as the server does. */
function setRead(chat: Chat, sequence: bigint): void {
  const capped = sequence < chat.lastSequence ? sequence : chat.lastSequence;
  if (capped > chat.readSequence) chat.readSequence = capped;
  chat.unreadCount = chat.lastSequence - chat.readSequence;
}

function markRead(s: SignedIn, chatId: string, sequence: bigint): void {
  s.api.chats.markRead({ chatId, sequence }).then(({ chat }) => {
    const known = s.chats.get(chatId);
    if (chat && known) {
      if (chat.lastSequence > known.lastSequence) known.lastSequence = chat.lastSequence;
      setRead(known, chat.readSequence);
      renderChats();
    }
  }, report);
}

// ---- chats

let refreshTimer: ReturnType<typeof setTimeout> | undefined;

function scheduleRefresh(s: SignedIn): void {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => void refreshChats(s).catch(report), 100);
}

async function refreshChats(s: SignedIn): Promise<void> {
  const res = await s.api.chats.listChats({ pageSize: 50 });
  if (current !== s) return;
  const chats = new Map(res.chats.map((c) => [c.id, c]));
  // The open chat may be beyond the first page.
  const open = s.open && s.chats.get(s.open.id);
  if (open && !chats.has(open.id)) chats.set(open.id, open);
  s.chats = chats;
  s.moreChatsToken = res.nextPageToken;
  renderChats();
}

async function moreChats(s: SignedIn): Promise<void> {
  if (!s.moreChatsToken) return;
  const res = await s.api.chats.listChats({ pageSize: 50, pageToken: s.moreChatsToken });
  for (const chat of res.chats) if (!s.chats.has(chat.id)) s.chats.set(chat.id, chat);
  s.moreChatsToken = res.nextPageToken;
  renderChats();
}

async function createChat(s: SignedIn, name: string, memberIds: string[]): Promise<void> {
  const { chat } = await s.api.chats.createChat({ name, memberIds });
  if (!chat) return;
  s.chats.set(chat.id, chat);
  renderChats();
  await openChat(s, chat.id);
}

// ---- one chat

async function openChat(s: SignedIn, id: string): Promise<void> {
  const open: OpenChat = { id, messages: new Map(), olderPageToken: "", members: [], moreMembers: false };
  s.open = open;
  renderChats();
  renderChat();
  input("composer-text").focus();
  await Promise.all([loadLatest(s, open), loadMembers(s, open)]);
  const chat = s.chats.get(id);
  if (s.open === open && chat && chat.unreadCount > 0n) {
    setRead(chat, chat.lastSequence);
    renderChats();
    markRead(s, id, chat.lastSequence);
  }
}

function closeChat(s: SignedIn): void {
  s.open = undefined;
  renderChat();
}

async function loadLatest(s: SignedIn, open: OpenChat): Promise<void> {
  const page = await s.api.messages.listMessages({ chatId: open.id, pageSize: PAGE_SIZE }); // newest first
  if (s.open !== open) return;
  open.olderPageToken = page.nextPageToken;
  addMessages(s, open, page.messages, "bottom");
}

/** Paging back through history. */
async function loadOlder(s: SignedIn, open: OpenChat): Promise<void> {
  if (!open.olderPageToken) return;
  const page = await s.api.messages.listMessages({ chatId: open.id, pageSize: PAGE_SIZE, pageToken: open.olderPageToken });
  if (s.open !== open) return;
  open.olderPageToken = page.nextPageToken;
  addMessages(s, open, page.messages, "keep");
}

/** Everything after the newest message shown (after a reconnect, or a gap in live events). */
async function catchUp(s: SignedIn, open: OpenChat): Promise<void> {
  if (open.messages.size === 0) return loadLatest(s, open);
  for (;;) {
    const page = await s.api.messages.listMessages({
      chatId: open.id, afterSequence: newestSequence(open), order: Order.OLDEST_FIRST, pageSize: CATCH_UP_PAGE_SIZE,
    });
    if (s.open !== open) return;
    addMessages(s, open, page.messages, "follow");
    if (page.messages.length < CATCH_UP_PAGE_SIZE || !page.nextPageToken) return;
  }
}

async function send(s: SignedIn, open: OpenChat, text: string): Promise<void> {
  const { message } = await s.api.messages.sendMessage({ chatId: open.id, text, clientMessageId: randomId() });
  if (message && s.open === open) addMessages(s, open, [message], "bottom");
}

async function loadMembers(s: SignedIn, open: OpenChat): Promise<void> {
  const res = await s.api.members.listMembers({ chatId: open.id, pageSize: 200 });
  if (s.open !== open) return;
  open.members = res.members;
  open.moreMembers = res.nextPageToken !== "";
  renderMembers(s, open);
}

async function addMembers(s: SignedIn, open: OpenChat, userIds: string[]): Promise<void> {
  await s.api.members.addMembers({ chatId: open.id, userIds });
  await loadMembers(s, open);
}

async function removeMember(s: SignedIn, open: OpenChat, userId: string): Promise<void> {
  await s.api.members.removeMember({ chatId: open.id, userId });
  if (userId === s.session.user) {
    s.chats.delete(open.id);
    if (s.open === open) closeChat(s);
    renderChats();
  } else {
    await loadMembers(s, open);
  }
}

function newestSequence(open: OpenChat): bigint {
  let newest = 0n;
  for (const sequence of open.messages.keys()) if (sequence > newest) newest = sequence;
  return newest;
}

// ---- rendering

function setStatus(state: "live" | "connecting" | "offline"): void {
  el.status.dataset.state = state;
  el.status.textContent = state === "connecting" ? "connecting…" : state;
}

let errorTimer: ReturnType<typeof setTimeout> | undefined;

function showError(text: string): void {
  el.error.textContent = text;
  el.error.hidden = false;
  clearTimeout(errorTimer);
  errorTimer = setTimeout(() => (el.error.hidden = true), 8000);
}

function report(error: unknown): void {
  if (isUnauthenticated(error)) return signOut(`signed out: ${errorText(error)}`);
  showError(error instanceof Error && !("code" in error) ? error.message : errorText(error));
}

function activity(chat: Chat): number {
  const time = chat.lastSequence > 0n && chat.lastMessageTime ? chat.lastMessageTime : chat.createTime;
  return time ? timestampDate(time).getTime() : 0;
}

function renderChats(): void {
  const s = current;
  if (!s) return;
  const chats = [...s.chats.values()].sort((a, b) => activity(b) - activity(a) || (a.id < b.id ? 1 : -1));
  el.chats.replaceChildren(
    ...chats.map((chat) =>
      h("li", { class: "chat-item", "data-chat-id": chat.id, "aria-current": s.open?.id === chat.id ? "true" : undefined },
        h("button", { type: "button" },
          h("span", { class: "chat-name" }, chat.name || "(no name)"),
          h("span", { class: "chat-meta" }, `${chat.memberCount} member${chat.memberCount === 1 ? "" : "s"}`),
          chat.unreadCount > 0n && h("span", { class: "unread", title: "unread messages" }, String(chat.unreadCount)),
        ),
      ),
    ),
  );
  if (chats.length === 0) el.chats.append(h("li", { class: "empty" }, "No chats yet: create one above."));
  el.moreChats.hidden = s.moreChatsToken === "";
}

function renderChat(): void {
  const s = current;
  const open = s?.open;
  el.chat.hidden = !open;
  el.noChat.hidden = !!open;
  if (!s || !open) return;
  el.chatName.textContent = s.chats.get(open.id)?.name || "(no name)";
  el.chatName.title = `chat ${open.id}`;
  renderMessages(s, open);
  renderMembers(s, open);
}

/**
 * "bottom": scroll to the newest; "follow": only if the reader was already there; "keep": keep what
 * the reader sees in place (older messages were added above).
 */
function addMessages(s: SignedIn, open: OpenChat, messages: Message[], scroll: "bottom" | "follow" | "keep"): void {
  if (s.open !== open) return;
  const box = el.messages;
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 60;
  const fromBottom = box.scrollHeight - box.scrollTop;
  for (const message of messages) open.messages.set(message.sequence, message);
  renderMessages(s, open);
  if (scroll === "bottom" || (scroll === "follow" && atBottom)) box.scrollTop = box.scrollHeight;
  else if (scroll === "keep") box.scrollTop = box.scrollHeight - fromBottom;
}

function renderMessages(s: SignedIn, open: OpenChat): void {
  el.loadOlder.hidden = open.olderPageToken === "";
  const messages = [...open.messages.values()].sort((a, b) => (a.sequence < b.sequence ? -1 : 1));
  el.messageList.replaceChildren(
    ...messages.map((m) => {
      const time = m.createTime ? timestampDate(m.createTime) : undefined;
      return h("li", { class: "message", "data-sequence": String(m.sequence), "data-mine": m.senderId === s.session.user ? "true" : undefined },
        h("div", { class: "meta" },
          h("span", { class: "sender" }, m.senderId),
          time && h("time", { datetime: time.toISOString() }, time.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })),
          h("span", { class: "sequence" }, `#${m.sequence}`),
        ),
        h("div", { class: "text" }, m.text),
      );
    }),
  );
  if (messages.length === 0 && open.olderPageToken === "") el.messageList.append(h("li", { class: "empty" }, "No messages yet: say hello."));
}

function renderMembers(s: SignedIn, open: OpenChat): void {
  el.memberCount.textContent = `${open.members.length}${open.moreMembers ? "+" : ""} member${open.members.length === 1 ? "" : "s"}`;
  el.members.replaceChildren(
    ...open.members.map((m) => {
      const me = m.userId === s.session.user;
      return h("li", { class: "member", "data-user-id": m.userId },
        h("span", {}, me ? `${m.userId} (you)` : m.userId),
        h("button", { type: "button", class: "remove-member", "data-user-id": m.userId }, me ? "Leave" : "Remove"),
      );
    }),
  );
}

// ---- wiring

/** Runs a UI action, showing its error; forms are disabled meanwhile so nothing is sent twice. */
function act(form: HTMLFormElement | undefined, action: () => Promise<void>): void {
  const fieldset = form ? [...form.elements].filter((e): e is HTMLButtonElement => e instanceof HTMLButtonElement) : [];
  for (const button of fieldset) button.disabled = true;
  action().catch(report).finally(() => {
    for (const button of fieldset) button.disabled = false;
  });
}

function onSubmit(form: HTMLFormElement, action: () => Promise<void>): void {
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    act(form, action);
  });
}

const ids = (text: string) => text.split(/[\s,]+/).filter((id) => id !== "");

function wire(): void {
  onSubmit(el.devSignin, async () => {
    signIn(await devToken(input("signin-tenant").value.trim(), input("signin-user").value.trim()));
  });
  onSubmit(el.tokenSignin, async () => {
    const field = byId<HTMLTextAreaElement>("signin-token");
    signIn(field.value.trim());
    field.value = "";
  });
  el.signOut.addEventListener("click", () => signOut());
  onSubmit(el.newChat, async () => {
    if (!current) return;
    await createChat(current, input("new-chat-name").value.trim(), ids(input("new-chat-members").value));
    el.newChat.reset();
  });
  el.chats.addEventListener("click", (event) => {
    const item = (event.target as Element).closest<HTMLElement>("[data-chat-id]");
    if (current && item?.dataset.chatId) act(undefined, () => openChat(current!, item.dataset.chatId!));
  });
  el.moreChats.addEventListener("click", () => current && act(undefined, () => moreChats(current!)));
  el.loadOlder.addEventListener("click", () => {
    const s = current;
    if (s?.open) act(undefined, () => loadOlder(s, s.open!));
  });
  onSubmit(el.composer, async () => {
    const field = input("composer-text");
    const text = field.value;
    if (!current?.open || text.trim() === "") return;
    await send(current, current.open, text);
    field.value = "";
    field.focus();
  });
  onSubmit(el.addMember, async () => {
    if (!current?.open) return;
    await addMembers(current, current.open, ids(input("add-member-ids").value));
    el.addMember.reset();
  });
  el.members.addEventListener("click", (event) => {
    const button = (event.target as Element).closest<HTMLElement>(".remove-member");
    const s = current;
    if (s?.open && button?.dataset.userId) act(undefined, () => removeMember(s, s.open!, button.dataset.userId!));
  });
}

wire();
const token = takeToken();
let signedIn = false;
if (token) {
  try {
    signIn(token);
    signedIn = true;
  } catch (error) {
    showError(`sign-in: ${(error as Error).message}`);
  }
}
if (!signedIn) void showSignIn();

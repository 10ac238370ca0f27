-- Every table is keyed by tenant first: no row is reachable without its tenant.
CREATE TABLE chats (
  tenant_id         text        NOT NULL,
  id                uuid        NOT NULL,
  name              text        NOT NULL,
  creator_id        text        NOT NULL,
  create_time       timestamptz NOT NULL,
  member_count      integer     NOT NULL DEFAULT 0,
  last_sequence     bigint      NOT NULL DEFAULT 0,
  last_message_time timestamptz,
  -- last message time, else creation time: the ListChats order
  activity_time     timestamptz NOT NULL,
  PRIMARY KEY (tenant_id, id)
);

CREATE TABLE members (
  tenant_id     text        NOT NULL,
  chat_id       uuid        NOT NULL,
  user_id       text        NOT NULL,
  join_seq      bigint      GENERATED ALWAYS AS IDENTITY,
  join_time     timestamptz NOT NULL,
  added_by      text        NOT NULL,
  read_sequence bigint      NOT NULL DEFAULT 0,
  PRIMARY KEY (tenant_id, chat_id, user_id),
  FOREIGN KEY (tenant_id, chat_id) REFERENCES chats (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX members_by_user ON members (tenant_id, user_id, chat_id);
CREATE INDEX members_join_order ON members (tenant_id, chat_id, join_seq);

CREATE TABLE messages (
  tenant_id         text        NOT NULL,
  chat_id           uuid        NOT NULL,
  sequence          bigint      NOT NULL,
  id                uuid        NOT NULL,
  sender_id         text        NOT NULL,
  text              text        NOT NULL,
  create_time       timestamptz NOT NULL,
  client_message_id text,
  PRIMARY KEY (tenant_id, chat_id, sequence),
  FOREIGN KEY (tenant_id, chat_id) REFERENCES chats (tenant_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX messages_by_id ON messages (tenant_id, id);
CREATE UNIQUE INDEX messages_idempotency ON messages (tenant_id, chat_id, sender_id, client_message_id)
  WHERE client_message_id IS NOT NULL;
CREATE INDEX messages_by_time ON messages (tenant_id, chat_id, create_time, sequence);

-- Server-wide secrets shared by all instances (the page-token signing key).
CREATE TABLE server_secrets (
  name  text  PRIMARY KEY,
  value bytea NOT NULL
);

import { WebSocket } from "ws";

/**
 * A ws WebSocket that lets the hub say why before ws closes a connection on its own. When a frame
 * breaks a limit (1009 Message Too Big: over maxPayload, found from the frame header before the
 * payload is buffered) or the WebSocket protocol (1002, 1007 invalid UTF-8), ws calls close(code) with
 * no reason while the socket is still open; the hub then sends a SignalR Close message first, so
 * SignalR clients report an error instead of a bare close code.
 */
export class HubSocket extends WebSocket {
  onFrameError: ((code: number) => void) | undefined;

  override close(code?: number, data?: string | Buffer): void {
    // ws's receiver is the only caller that passes a code without a reason; closes after a close
    // frame from the peer always pass one.
    if (code !== undefined && data === undefined && this.readyState === WebSocket.OPEN) {
      const onFrameError = this.onFrameError;
      this.onFrameError = undefined;
      onFrameError?.(code);
      super.close(code, closeReasons[code] ?? "protocol error");
      return;
    }
    super.close(code, data);
  }
}

const closeReasons: Record<number, string> = {
  1002: "protocol error",
  1007: "invalid UTF-8",
  1009: "message too big",
};

/**
 * herald-client: the TypeScript/JavaScript SDK for Herald, over WebSocket.
 *
 * - `HeraldClient`: connects (gateway URLs or the dispatcher), binds apps,
 *   keeps heartbeats, delivers and acks pushes and broadcasts (pulling the
 *   bodies of notified messages), and reconnects with backoff, resuming
 *   from the last acked seqs.
 * - `ClientConn`: the sans-IO state machine of one connection.
 * - The codec: `encodeFrame`, `decodeFrame`, `decodeMessage` and the
 *   protocol's constants.
 */

export * from "./codec.js";
export * from "./conn.js";
export * from "./reconnect.js";
export * from "./dispatch.js";
export * from "./storage.js";
export * from "./heartbeat.js";
export * from "./client.js";
export { EventStream } from "./events.js";
export type { NotifyGoneEvent } from "./pull.js";
export type { WebSocketConstructor, WebSocketLike } from "./websocket.js";

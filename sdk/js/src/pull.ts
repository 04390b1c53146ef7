/**
 * Notify, then pull: what `HeraldClient` does on one connection with the
 * NOTIFY frames `ClientConn` reports. It pulls each body after a random
 * delay of up to the NOTIFY's `pull_spread_ms` (so a notify sent to many
 * users does not come back as as many pulls at once), keeps at most
 * `PULLS_IN_FLIGHT_MAX` PULLs unanswered, pulls again with backoff when
 * storage was unavailable, and hands messages to the application in seq
 * order per app: what arrives after a NOTIFY whose body is not there yet
 * waits for it.
 *
 * It lives as long as its connection: on a disconnect the server sends
 * every unacked NOTIFY and PUSH again on the next bind, so nothing held
 * here needs to outlive it.
 */

import { PULLS_IN_FLIGHT_MAX, PullStatus } from "./codec.js";
import type { NotifyEvent, PulledEvent, PushEvent } from "./conn.js";
import { Backoff, type BackoffOptions } from "./reconnect.js";

/**
 * A notified message whose PULL answered `gone`: the inbox no longer holds
 * it (it expired), so there is no body to come. Its seq counts as
 * delivered: auto ack acks it once handled; in manual mode ack it.
 */
export interface NotifyGoneEvent {
  type: "notifyGone";
  app: string;
  seq: bigint;
  /** The id the NOTIFY named. */
  messageId: string;
}

/** What an app's inbox hands the application, in seq order. */
export type Delivery = PushEvent | NotifyGoneEvent;

/** Pulling again after `unavailable` or `busy`: 1 s doubling to 30 s, full jitter. */
export const PULL_RETRY_BACKOFF: BackoffOptions = { initialMs: 1_000, maxMs: 30_000 };

export interface PullerIo {
  /** Queues a PULL on the connection; false if it cannot (the app is not bound). */
  pull(app: string, seq: bigint): boolean;
  /** Sends what was queued; called after the work a timer set off. */
  flush(): void;
  /** Hands a message to the application. */
  deliver(event: Delivery): void;
  timers: { setTimeout(fn: () => void, ms: number): unknown; clearTimeout(handle: unknown): void };
  /** Numbers in [0, 1), for the spread and the jitter. */
  random: () => number;
}

/** One PULL to send, and what to do with its answer. */
export interface PullRequest {
  app: string;
  seq: bigint;
  answer(reply: PulledEvent): void;
  /** The connection ended before the answer. */
  lost?(): void;
}

/** A notified message whose body is awaited, or a message waiting behind one. */
interface Held {
  /** What to hand out once it is this one's turn; undefined while the body is awaited. */
  ready: Delivery | undefined;
  /** The timer of the next PULL (the spread, or a retry's backoff). */
  timer: unknown;
  retries: Backoff | undefined;
}

export class Puller {
  /** PULLs waiting for one of the unanswered ones to be answered. */
  private readonly queued: PullRequest[] = [];
  /** PULLs sent and not answered, by app and seq (the server answers in no promised order). */
  private readonly sent = new Map<string, PullRequest[]>();
  private sentCount = 0;
  /** Per app, in seq order: the head is a NOTIFY whose body is awaited. */
  private readonly held = new Map<string, Held[]>();
  private readonly timers = new Set<unknown>();

  constructor(private readonly io: PullerIo) {}

  /** Sends a PULL, or queues it while `PULLS_IN_FLIGHT_MAX` are unanswered. */
  request(request: PullRequest): void {
    if (this.sentCount >= PULLS_IN_FLIGHT_MAX) {
      this.queued.push(request);
      return;
    }
    if (!this.io.pull(request.app, request.seq)) {
      // Unbound since it was asked for: answered as the server would.
      request.answer({
        type: "pulled",
        app: request.app,
        seq: request.seq,
        status: PullStatus.NotBound,
        statusName: "not_bound",
        messageId: "0".repeat(32),
        payload: new Uint8Array(),
      });
      return;
    }
    const key = keyOf(request.app, request.seq);
    const list = this.sent.get(key);
    if (list === undefined) this.sent.set(key, [request]);
    else list.push(request);
    this.sentCount++;
  }

  /** A PULL_REPLY: to the PULL it answers, and the next queued one goes out. */
  answered(reply: PulledEvent): void {
    const key = keyOf(reply.app, reply.seq);
    const request = this.sent.get(key)?.shift();
    // A reply to no PULL of this connection.
    if (request === undefined) return;
    if (this.sent.get(key)!.length === 0) this.sent.delete(key);
    this.sentCount--;
    while (this.sentCount < PULLS_IN_FLIGHT_MAX && this.queued.length > 0) this.request(this.queued.shift()!);
    request.answer(reply);
  }

  /** A NOTIFY: its PULL goes out after the spread, and what follows it waits for its body. */
  notify(event: NotifyEvent): void {
    const entry: Held = { ready: undefined, timer: undefined, retries: undefined };
    const list = this.held.get(event.app);
    if (list === undefined) this.held.set(event.app, [entry]);
    else list.push(entry);
    const request: PullRequest = {
      app: event.app,
      seq: event.seq,
      answer: (reply) => {
        if (!this.held.get(event.app)?.includes(entry)) return;
        switch (reply.status) {
          case PullStatus.Ok:
            entry.ready = {
              type: "push",
              app: event.app,
              messageId: reply.messageId,
              seq: event.seq,
              payload: reply.payload,
              pulled: true,
            };
            this.release(event.app);
            return;
          case PullStatus.Gone:
            entry.ready = { type: "notifyGone", app: event.app, seq: event.seq, messageId: event.messageId };
            this.release(event.app);
            return;
          case PullStatus.NotBound:
            // Nothing more comes for the app on this connection; unacked,
            // the NOTIFY comes again when the app is bound next.
            this.forget(event.app);
            return;
          default:
            // unavailable, busy, and codes this version does not know: the
            // body may still come, and what waits behind it needs it.
            entry.retries ??= new Backoff(PULL_RETRY_BACKOFF);
            entry.timer = this.after(entry.retries.next(this.io.random), () => this.request(request));
        }
      },
    };
    entry.timer = this.after(this.io.random() * event.pullSpreadMs, () => this.request(request));
  }

  /** A PUSH: handed out at once, unless it must wait behind a NOTIFY of its app. */
  push(event: PushEvent): void {
    const list = this.held.get(event.app);
    if (list === undefined) this.io.deliver(event);
    else list.push({ ready: event, timer: undefined, retries: undefined });
  }

  /** The app is not bound any more on this connection: drop what is held for it. */
  forget(app: string): void {
    for (const entry of this.held.get(app) ?? []) this.cancel(entry.timer);
    this.held.delete(app);
  }

  /** The connection ended: no timer fires, and unanswered requests learn they are lost. */
  close(): void {
    for (const handle of this.timers) this.io.timers.clearTimeout(handle);
    this.timers.clear();
    this.held.clear();
    const pending = [...this.queued, ...[...this.sent.values()].flat()];
    this.queued.length = 0;
    this.sent.clear();
    this.sentCount = 0;
    for (const request of pending) request.lost?.();
  }

  /** Hands out the app's messages from the head of its queue up to the first body still awaited. */
  private release(app: string): void {
    const list = this.held.get(app);
    if (list === undefined) return;
    while (list.length > 0 && list[0]!.ready !== undefined) this.io.deliver(list.shift()!.ready!);
    if (list.length === 0) this.held.delete(app);
  }

  private after(ms: number, fn: () => void): unknown {
    const handle = this.io.timers.setTimeout(() => {
      this.timers.delete(handle);
      fn();
      this.io.flush();
    }, ms);
    this.timers.add(handle);
    return handle;
  }

  private cancel(handle: unknown): void {
    if (handle === undefined || !this.timers.delete(handle)) return;
    this.io.timers.clearTimeout(handle);
  }
}

function keyOf(app: string, seq: bigint): string {
  return `${seq} ${app}`;
}

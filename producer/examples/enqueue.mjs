// Enqueue one ticket for thinfleet from Node.js, with no dependencies: the wire format of
// README "Enqueue from any language", spoken to Redis over a plain TCP socket (RESP).
//
//   node producer/examples/enqueue.mjs redis://127.0.0.1:6379/0 T-1042 "My card has not arrived"
//
// Prints {"ticket_id", "task_id", "duplicate"}. Read the result from the thinfleet:results
// stream (XREAD), or the thinfleet:outcome:<ticket_id> pointer.
import net from "node:net";
import { randomUUID } from "node:crypto";

const [url = "redis://127.0.0.1:6379/0", ticketId = `node-${randomUUID()}`, text = "Where is my card?"] =
  process.argv.slice(2);
const { hostname, port, pathname } = new URL(url);
const db = pathname.replace("/", "") || "0";

const QUEUE = "thinfleet.route";             // models/keys.py ROUTE_QUEUE
const TASK = "thinfleet.route_ticket";       // models/keys.py ROUTE_TASK
const DEDUPE_WINDOW_S = 24 * 3600;           // models/keys.py DEFAULT_DEDUPE_WINDOW_S

// The ticket (models/schemas.py TicketEvent): no other top-level fields (extra="forbid": an
// unknown field is dead-lettered as invalid_ticket); extra data goes in metadata (strings).
const ticket = { ticket_id: ticketId, text, metadata: { channel: "node-example" },
                 enqueued_at: new Date().toISOString() };
const taskId = randomUUID();
// Celery message protocol 2, as kombu's Redis transport stores it.
const body = [[ticket], {}, { callbacks: null, errbacks: null, chain: null, chord: null }];
const envelope = {
  body: Buffer.from(JSON.stringify(body)).toString("base64"),
  "content-encoding": "utf-8",
  "content-type": "application/json",
  headers: { lang: "js", task: TASK, id: taskId, root_id: taskId, parent_id: null, group: null,
             retries: 0, eta: null, expires: null, timelimit: [null, null],
             argsrepr: JSON.stringify([ticket]).slice(0, 200), kwargsrepr: "{}", origin: "node" },
  properties: { correlation_id: taskId, reply_to: "", delivery_mode: 2,
                delivery_info: { exchange: "", routing_key: QUEUE }, priority: 0,
                body_encoding: "base64", delivery_tag: taskId },
};

// A minimal RESP client: send one command, read one reply.
function resp(socket, ...args) {
  const wire = `*${args.length}\r\n` + args.map((a) => {
    const s = String(a);
    return `$${Buffer.byteLength(s)}\r\n${s}\r\n`;
  }).join("");
  return new Promise((resolve, reject) => {
    socket.once("data", (data) => {
      const line = data.toString();
      if (line[0] === "-") reject(new Error(line.slice(1).trim()));
      else if (line.startsWith("$-1")) resolve(null);
      else if (line[0] === "$") resolve(line.split("\r\n")[1]);
      else resolve(line.slice(1).trim());
    });
    socket.write(wire);
  });
}

const socket = net.connect(Number(port || 6379), hostname);
await new Promise((resolve, reject) => { socket.once("connect", resolve); socket.once("error", reject); });
try {
  if (db !== "0") await resp(socket, "SELECT", db);
  // Dedupe exactly as producer.Producer.submit does: claim the ticket id first.
  const claimed = await resp(socket, "SET", `thinfleet:dedupe:${ticketId}`, taskId, "NX", "EX", DEDUPE_WINDOW_S);
  if (claimed === null) {
    const first = await resp(socket, "GET", `thinfleet:dedupe:${ticketId}`);
    console.log(JSON.stringify({ ticket_id: ticketId, task_id: first, duplicate: true }));
  } else {
    try {
      await resp(socket, "LPUSH", QUEUE, JSON.stringify(envelope));
    } catch (err) {
      await resp(socket, "DEL", `thinfleet:dedupe:${ticketId}`);  // release the claim
      throw err;
    }
    console.log(JSON.stringify({ ticket_id: ticketId, task_id: taskId, duplicate: false }));
  }
} finally {
  socket.end();
}

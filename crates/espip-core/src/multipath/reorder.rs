//! The reorder stage: a multipath peer's packets, which arrive out of order across paths, held
//! until the gap before them fills or the hold expires.

use super::*;

/// One packet waiting in the reorder stage (`None`: a sequence number that carried nothing to
/// deliver, a probe for example, kept so the gap it would leave is not waited for).
#[derive(Debug)]
struct Held {
    data: Option<Vec<u8>>,
    deadline: u64,
    /// Not delivered before this, even in order (the delay of its path made equal to the
    /// slowest live path's: see [`Reorder::offer_after`]).
    not_before: u64,
}

/// Counters of a reorder stage.
#[derive(Debug, Default)]
pub struct ReorderStats {
    /// Packets that waited for a gap ahead of them.
    pub held: AtomicU64,
    /// Gaps given up on (the hold time passed, or the stage was full): packets lost on a path.
    pub gaps_skipped: AtomicU64,
    /// Packets that arrived after their gap was given up on (delivered at once).
    pub late: AtomicU64,
    /// Packets delivered out of order because the stage was full.
    pub overflow: AtomicU64,
    /// Lost packets asked for again ([`Nack`]).
    pub asked: AtomicU64,
    /// Packets asked for that came (repaired, or late on their own path).
    pub repaired: AtomicU64,
}

/// The receiver's reorder stage of one peer, keyed by the ESP sequence number: a packet that
/// arrives in order is delivered at once; one ahead of a gap waits until the gap fills or its
/// hold time passes; one behind (its gap already given up) is delivered at once. Memory is
/// bounded by packets and bytes; buffers are recycled.
#[derive(Debug)]
pub struct Reorder {
    /// The next sequence number to deliver (0: nothing seen yet).
    next: u64,
    held: BTreeMap<u64, Held>,
    bytes: usize,
    max_packets: usize,
    max_bytes: usize,
    free: Vec<Vec<u8>>,
    /// Per path: the highest sequence number received and when. Each path delivers in order
    /// (a link is a FIFO), so a gap below what every recently active path has delivered is a
    /// loss, not a packet still on its way: it is not waited for.
    tops: [(u64, u64); MAX_PATHS],
    /// How long a path counts as active after its last packet.
    active_ns: u64,
    /// The paths that may carry packets (bit i: path i; not found down by our own probes).
    live: u32,
    /// The ESP SAs whose packets the stage has ordered, each with its epoch: an IKEv2 rekey
    /// starts a new SA whose sequence numbers start again at 1, and every packet of it comes
    /// after every packet of the SA before it. The stage orders by [`Reorder::key`].
    sas: Vec<(u32, u64)>,
    /// Keys asked for again, each with when.
    asked: BTreeMap<u64, u64>,
    /// Keys to ask for (taken by [`Reorder::take_asks`]).
    to_ask: Vec<u64>,
    /// Lost packets are asked for again.
    repair: bool,
    /// Packets offered and packets found lost, this [`LOSS_PERIOD`] (from its start) and the
    /// one before: (start, offered, lost, offered before, lost before).
    loss: (u64, u64, u64, u64, u64),
}

/// The period over which the loss rate that decides between a path's random loss (repaired)
/// and a queue's drops (left to the connection inside) is counted.
const LOSS_PERIOD: u64 = 100_000_000;

/// Above this share of lost packets (and more than two lost) in the last one or two loss
/// periods, a loss is a queue's drop: a connection inside must see it to slow down, so it is
/// not asked for again (repaired, the congestion signal was lost: one TCP stream's slow start
/// over two clean links overshot and stayed over them, 168.6 against 176.0 Mbit/s).
const RANDOM_LOSS: f64 = 0.03;

/// Most packets asked for at once (a cut's loss, beyond it, is left to TCP).
const MAX_ASK: u64 = 1024;

/// Bits of a reorder key that hold the ESP sequence number (the rest: the SA's epoch). 2^48
/// packets is nine years at a million packets a second: no SA lives that long.
const SEQ_BITS: u32 = 48;
/// The first SA's epoch (room below for older SAs first seen after newer ones).
const EPOCH0: u64 = 1 << 14;
/// SAs remembered: a rekey keeps at most three or so accepted at once.
const MAX_SAS: usize = 8;

/// What the reorder stage does with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Deliver it now.
    Now,
    /// Copied into the stage; [`Reorder::release`] delivers it.
    Held,
}

impl Reorder {
    /// A stage holding at most `max_packets` packets and `max_bytes` bytes.
    pub fn new(max_packets: usize, max_bytes: usize) -> Reorder {
        Reorder {
            next: 0,
            held: BTreeMap::new(),
            bytes: 0,
            max_packets: max_packets.max(1),
            max_bytes,
            free: Vec::new(),
            tops: [(0, 0); MAX_PATHS],
            active_ns: 0,
            live: 0,
            sas: Vec::new(),
            asked: BTreeMap::new(),
            to_ask: Vec::new(),
            repair: false,
            loss: (0, 0, 0, 0, 0),
        }
    }

    /// New limits (a reload), keeping what is held.
    pub fn resize(&mut self, max_packets: usize, max_bytes: usize) {
        self.max_packets = max_packets.max(1);
        self.max_bytes = max_bytes;
    }

    /// The order of sequence number `seq` of the SA `spi` among everything this stage
    /// orders: its SA's epoch, then the number. An SA seen for the first time is newer than
    /// every SA seen so far when it is the one the peer's newest keys belong to (`newest`: a
    /// rekey's new SA), else older than all of them (a stage that starts while an old SA still
    /// delivers). So after a rekey the new SA's packets wait, like any packet behind a gap,
    /// until every path has delivered past the old SA's last ones (paths are FIFOs) or their
    /// hold time passes: the switch costs no reordering and loses nothing.
    pub fn key(&mut self, spi: u32, newest: bool, seq: u64) -> u64 {
        let epoch = match self.sas.iter().find(|(s, _)| *s == spi) {
            Some((_, e)) => *e,
            None => {
                let e = if newest {
                    self.sas.iter().map(|x| x.1).max().map_or(EPOCH0, |m| m + 1)
                } else {
                    self.sas
                        .iter()
                        .map(|x| x.1)
                        .min()
                        .map_or(EPOCH0, |m| m.saturating_sub(1).max(1))
                };
                if self.sas.len() == MAX_SAS {
                    if let Some(i) = (0..self.sas.len()).min_by_key(|&i| self.sas[i].1) {
                        self.sas.remove(i);
                    }
                }
                self.sas.push((spi, e));
                e
            }
        };
        (epoch << SEQ_BITS) | (seq & ((1 << SEQ_BITS) - 1))
    }

    /// Whether lost packets are asked for again (the peer's `repair`).
    pub fn set_repair(&mut self, on: bool) {
        self.repair = on;
    }

    /// The keys to ask for since the last call, ascending, as (SPI, sequence number) pairs.
    pub fn take_asks(&mut self) -> Vec<(u32, u64)> {
        let keys = std::mem::take(&mut self.to_ask);
        keys.into_iter()
            .filter_map(|k| {
                let epoch = k >> SEQ_BITS;
                let spi = self.sas.iter().find(|(_, e)| *e == epoch)?.0;
                Some((spi, k & ((1 << SEQ_BITS) - 1)))
            })
            .collect()
    }

    /// Ask for the keys of the gap at `self.next` (every path has passed it: below `floor`),
    /// in `next`'s SA, at most [`MAX_ASK`], unless they are a queue's drops
    /// (see [`RANDOM_LOSS`]). The gap is not waited for: a repair comes a round trip of the
    /// fastest path later and is delivered at once, out of order, which TCP's reordering
    /// window (RACK) takes in place of a retransmission (measured, waiting the fastest
    /// path's RTT for each repair instead held every packet behind the gap as long: one bbr
    /// stream over a lossy and a clean link lost 6% of its rate, cubic gained nothing).
    fn ask(&mut self, floor: u64, now: u64, stats: &ReorderStats) {
        // What was asked for a second ago is forgotten (the oldest first: asked in order).
        while self
            .asked
            .first_key_value()
            .is_some_and(|(_, at)| at.saturating_add(1_000_000_000) <= now)
        {
            self.asked.pop_first();
        }
        // The gap ahead (the next ones are asked for when their turn comes): nothing in it is
        // held, so no lookup per number (scanning to the floor cost the RX thread a lookup for
        // every held packet at every gap).
        let epoch_end = ((self.next >> SEQ_BITS) + 1) << SEQ_BITS;
        let first_held = self.held.keys().next().copied().unwrap_or(u64::MAX);
        let to = floor
            .min(epoch_end)
            .min(first_held)
            .min(self.next + MAX_ASK);
        if self.asked.contains_key(&self.next) {
            return;
        }
        let lost: Vec<u64> = (self.next..to).collect();
        self.roll_loss(now);
        let (_, offered, before, offered_before, lost_before) = self.loss;
        let all = before + lost_before + lost.len() as u64;
        self.loss.2 += lost.len() as u64;
        if all > 2 && all as f64 > RANDOM_LOSS * (offered + offered_before + all) as f64 {
            // A queue's drops (or a cut): left to the connection inside.
            return;
        }
        for k in lost {
            self.asked.insert(k, now);
            self.to_ask.push(k);
            stats.asked.fetch_add(1, Relaxed);
        }
    }

    /// Start a new loss period at `now` if the current one is over.
    fn roll_loss(&mut self, now: u64) {
        let (start, offered, lost, ..) = self.loss;
        if now.saturating_sub(start) >= LOSS_PERIOD {
            let fresh = now.saturating_sub(start) >= 2 * LOSS_PERIOD;
            self.loss = if fresh {
                (now, 0, 0, 0, 0)
            } else {
                (now, 0, 0, offered, lost)
            };
        }
    }

    /// Which paths may carry packets (bit i: path i): a live path that has delivered nothing
    /// yet holds every gap open; a path not live holds none.
    pub fn set_live(&mut self, mask: u32) {
        self.live = mask;
    }

    /// A packet with sequence number `seq` arrived on `path` at `now`; a path that delivered
    /// nothing for `active_ns` no longer holds gaps open.
    pub fn note(&mut self, path: usize, seq: u64, now: u64, active_ns: u64) {
        if let Some(t) = self.tops.get_mut(path) {
            if seq > t.0 {
                *t = (seq, now);
            } else {
                t.1 = now;
            }
        }
        self.active_ns = active_ns;
    }

    /// The lowest of the live paths' highest sequence numbers: everything below it that has
    /// not arrived was lost. A live path that has delivered nothing yet makes it 0 (its first
    /// packets may be on their way); one idle for longer than the active time does not count.
    fn floor(&self, now: u64) -> u64 {
        self.tops
            .iter()
            .enumerate()
            .filter(|(i, (s, at))| {
                self.live & (1 << i) != 0 && (*s == 0 || now.saturating_sub(*at) <= self.active_ns)
            })
            .map(|(_, (s, _))| *s)
            .min()
            .unwrap_or(0)
    }

    /// Packets held now.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The earliest time a held packet must be released (`None`: nothing held).
    pub fn deadline(&self) -> Option<u64> {
        let gaps = self.held.values().map(|h| h.deadline).min()?;
        let (seq, first) = self.held.first_key_value()?;
        Some(if *seq == self.next {
            first.not_before
        } else {
            gaps.max(first.not_before)
        })
    }

    /// Whether [`Reorder::release`] has something to deliver at `now`.
    pub fn ready(&self, now: u64) -> bool {
        self.held.first_key_value().is_some_and(|(s, h)| {
            h.not_before <= now
                && (*s == self.next || h.deadline <= now || self.floor(now) > self.next)
        })
    }

    /// The peer says `seq` went on a path that may be down (a probe of another path): if it
    /// has not arrived, do not wait for it.
    pub fn forget(&mut self, seq: u64) {
        if self.next == 0 || seq < self.next {
            return;
        }
        if seq == self.next {
            self.next += 1;
            return;
        }
        self.held.entry(seq).or_insert(Held {
            data: None,
            deadline: 0,
            not_before: 0,
        });
    }

    /// A packet with sequence number `seq` (authenticated, not a duplicate) and `data` to
    /// deliver (`None`: nothing to deliver, only its place in the order) arrived at `now`; it
    /// may wait until `now + hold`.
    pub fn offer(
        &mut self,
        seq: u64,
        data: Option<&[u8]>,
        now: u64,
        hold: u64,
        stats: &ReorderStats,
    ) -> Order {
        self.offer_after(seq, data, now, hold, 0, stats)
    }

    /// [`Reorder::offer`] of a packet that is not delivered before `now + wait` even in order:
    /// its path is faster than the slowest live one by `wait`. With every packet as late as
    /// the slowest path's, the connection inside sees one delay whichever path a packet took:
    /// TCP's slow start took the step from the fast path's delay (its first packets) to the
    /// slowest one's (once packets spread) for a queue and ended at a few dozen segments
    /// (cubic's HyStart), which cost seconds of ramp on links of 10 and 100 ms.
    pub fn offer_after(
        &mut self,
        seq: u64,
        data: Option<&[u8]>,
        now: u64,
        hold: u64,
        wait: u64,
        stats: &ReorderStats,
    ) -> Order {
        if self.next == 0 {
            self.next = seq;
        }
        self.roll_loss(now);
        self.loss.1 += 1;
        let mut wait = wait;
        if self.asked.remove(&seq).is_some() {
            // Asked for (repaired, or late on its path): its delay is long enough already.
            stats.repaired.fetch_add(1, Relaxed);
            wait = 0;
        }
        if seq == self.next && (wait == 0 || data.is_none()) {
            self.next += 1;
            return Order::Now;
        }
        if seq < self.next {
            if data.is_some() {
                stats.late.fetch_add(1, Relaxed);
            }
            return Order::Now;
        }
        let len = data.map_or(0, <[u8]>::len);
        if self.held.len() >= self.max_packets || self.bytes + len > self.max_bytes {
            // Full: deliver this one out of order rather than lose it or grow; the held ones
            // keep their deadlines.
            stats.overflow.fetch_add(1, Relaxed);
            return Order::Now;
        }
        let data = data.map(|d| {
            let mut v = self.free.pop().unwrap_or_default();
            v.clear();
            v.extend_from_slice(d);
            v
        });
        self.bytes += len;
        if data.is_some() && seq != self.next {
            stats.held.fetch_add(1, Relaxed);
        }
        self.held.insert(
            seq,
            Held {
                data,
                deadline: now.saturating_add(hold.max(wait)),
                not_before: now.saturating_add(wait),
            },
        );
        Order::Held
    }

    /// Deliver, in order, up to `limit` held packets whose turn has come at `now`: the run
    /// that continues the order, and past a gap whose oldest waiting packet's hold time
    /// passed. `deliver` gets each packet's bytes. Returns how many were delivered.
    pub fn release(
        &mut self,
        now: u64,
        stats: &ReorderStats,
        limit: usize,
        mut deliver: impl FnMut(&[u8]),
    ) -> usize {
        let mut n = 0;
        let floor = self.floor(now);
        loop {
            if n == limit {
                break;
            }
            let Some((&seq, first)) = self.held.first_key_value() else {
                break;
            };
            let (not_before, deadline) = (first.not_before, first.deadline);
            if not_before > now {
                break;
            }
            if seq != self.next {
                // Every active path has delivered past the gap: it is lost (or it is the
                // step from one SA's numbers to the next one's, which is no loss), and asked
                // for again.
                if floor > self.next && self.repair {
                    self.ask(floor, now, stats);
                }
                if floor > self.next {
                    if seq >> SEQ_BITS == self.next >> SEQ_BITS {
                        stats.gaps_skipped.fetch_add(1, Relaxed);
                    }
                    self.next = floor.min(seq);
                    continue;
                }
                if deadline > now {
                    break;
                }
                if seq >> SEQ_BITS == self.next >> SEQ_BITS {
                    stats.gaps_skipped.fetch_add(1, Relaxed);
                }
            }
            let Some(mut e) = self.held.first_entry() else {
                break;
            };
            let h = e.get_mut();
            let data = h.data.take();
            e.remove();
            self.next = seq + 1;
            if let Some(d) = data {
                self.bytes -= d.len();
                deliver(&d);
                n += 1;
                if self.free.len() < 256 {
                    self.free.push(d);
                }
            }
        }
        n
    }
}

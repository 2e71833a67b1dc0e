//! Anti-replay window (RFC 4303 section 3.4.3) as a ring of 64-bit blocks (RFC 6479), with the
//! 64-bit extended sequence number inference of RFC 4303 appendix A2.
//!
//! Two steps, as Linux xfrm (`xfrm_replay_check` / `xfrm_replay_advance`) and strongSwan do:
//! [`ReplayWindow::check`] before the ICV is verified, [`ReplayWindow::advance`] only after.

const BLOCK_BITS: u64 = 64;

/// Outcome of a window check that rejects a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayError {
    /// The sequence number was already received.
    Duplicate,
    /// The sequence number is left of the window.
    TooOld,
    /// Sequence number 0 is never sent (RFC 4303 section 3.3.3).
    Zero,
}

/// The receive window of one inbound SA.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// Highest authenticated sequence number (64-bit; 0 = none yet).
    top: u64,
    /// Window size in packets; 0 disables the check.
    size: u64,
    /// Bitmap ring: bit `seq % (64 * blocks.len())` marks `seq` as seen.
    blocks: Vec<u64>,
}

impl ReplayWindow {
    /// A window of `size` packets (0 disables anti-replay). One block more than the size needs is
    /// kept so that sliding clears whole blocks (RFC 6479 section 3).
    pub fn new(size: u32) -> Self {
        let size = u64::from(size);
        let nblocks = if size == 0 {
            0
        } else {
            size.div_ceil(BLOCK_BITS) as usize + 1
        };
        ReplayWindow {
            top: 0,
            size,
            blocks: vec![0; nblocks],
        }
    }

    /// Window size in packets.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Highest authenticated sequence number so far.
    pub fn top(&self) -> u64 {
        self.top
    }

    fn bit(&self, seq: u64) -> (usize, u64) {
        let nbits = self.blocks.len() as u64 * BLOCK_BITS;
        let pos = seq % nbits;
        ((pos / BLOCK_BITS) as usize, 1u64 << (pos % BLOCK_BITS))
    }

    /// Reconstruct the full 64-bit sequence number from the low 32 bits received (RFC 4303
    /// appendix A2.2). Without ESN the low bits are the sequence number.
    pub fn infer_esn(&self, seq_lo: u32, esn: bool) -> Option<u64> {
        if !esn {
            return Some(u64::from(seq_lo));
        }
        // With anti-replay disabled the config refuses ESN; treat the window as 1 then.
        let w = self.size.max(1);
        let tl = self.top as u32;
        let th = (self.top >> 32) as u32;
        let bottom = tl.wrapping_sub((w - 1) as u32);
        let seq_hi = if u64::from(tl) >= w - 1 {
            // Case A: the window lies inside one 2^32 subspace.
            if seq_lo >= bottom {
                th
            } else {
                th.checked_add(1)?
            }
        } else if seq_lo >= bottom {
            // Case B, upper part: seq_lo belongs to the previous subspace.
            th.checked_sub(1)?
        } else {
            th
        };
        Some((u64::from(seq_hi) << 32) | u64::from(seq_lo))
    }

    /// Would `seq` be accepted? Call before verifying the ICV; it changes nothing.
    pub fn check(&self, seq: u64) -> Result<(), ReplayError> {
        if seq == 0 {
            return Err(ReplayError::Zero);
        }
        if self.size == 0 || seq > self.top {
            return Ok(());
        }
        if self.top - seq >= self.size {
            return Err(ReplayError::TooOld);
        }
        let (i, m) = self.bit(seq);
        if self.blocks[i] & m != 0 {
            Err(ReplayError::Duplicate)
        } else {
            Ok(())
        }
    }

    /// Record `seq` as received. Call only after the ICV verified and [`ReplayWindow::check`]
    /// passed.
    pub fn advance(&mut self, seq: u64) {
        if self.size == 0 {
            self.top = self.top.max(seq);
            return;
        }
        if seq > self.top {
            let cur_block = self.top / BLOCK_BITS;
            let new_block = seq / BLOCK_BITS;
            let diff = (new_block - cur_block).min(self.blocks.len() as u64);
            let n = self.blocks.len() as u64;
            for k in 1..=diff {
                self.blocks[((cur_block + k) % n) as usize] = 0;
            }
            self.top = seq;
        }
        let (i, m) = self.bit(seq);
        self.blocks[i] |= m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_in_order_and_rejects_duplicates() {
        let mut w = ReplayWindow::new(64);
        for s in 1..=200u64 {
            assert_eq!(w.check(s), Ok(()));
            w.advance(s);
            assert_eq!(w.check(s), Err(ReplayError::Duplicate));
        }
        assert_eq!(w.check(0), Err(ReplayError::Zero));
    }

    #[test]
    fn window_edges() {
        let mut w = ReplayWindow::new(64);
        w.advance(1000);
        // Right edge: anything above top is new.
        assert_eq!(w.check(1001), Ok(()));
        // Left edge: top - size + 1 is the oldest acceptable, top - size is too old.
        assert_eq!(w.check(1000 - 63), Ok(()));
        assert_eq!(w.check(1000 - 64), Err(ReplayError::TooOld));
        w.advance(1000 - 63);
        assert_eq!(w.check(1000 - 63), Err(ReplayError::Duplicate));
        // A jump far ahead clears the whole bitmap.
        w.advance(1_000_000);
        assert_eq!(w.check(999_999), Ok(()));
        assert_eq!(w.check(1_000_000 - 64), Err(ReplayError::TooOld));
    }

    #[test]
    fn reordering_inside_window_is_accepted_once() {
        let mut w = ReplayWindow::new(1024);
        let order = [5u64, 3, 4, 1, 2, 900, 10, 899, 6];
        for s in order {
            assert_eq!(w.check(s), Ok(()), "seq {s}");
            w.advance(s);
        }
        for s in order {
            assert_eq!(w.check(s), Err(ReplayError::Duplicate));
        }
        assert_eq!(w.check(7), Ok(()));
    }

    #[test]
    fn check_does_not_advance() {
        let mut w = ReplayWindow::new(32);
        assert_eq!(w.check(5), Ok(()));
        assert_eq!(w.check(5), Ok(()), "check alone must not mark");
        w.advance(5);
        assert_eq!(w.top(), 5);
    }

    #[test]
    fn disabled_window_accepts_everything_but_zero() {
        let mut w = ReplayWindow::new(0);
        w.advance(10);
        assert_eq!(w.check(10), Ok(()));
        assert_eq!(w.check(1), Ok(()));
        assert_eq!(w.check(0), Err(ReplayError::Zero));
    }

    #[test]
    fn esn_inference_case_a_and_b() {
        let mut w = ReplayWindow::new(64);
        // Fresh SA: top 0 is case B (Tl < W - 1); small numbers are in subspace 0.
        assert_eq!(w.infer_esn(1, true), Some(1));
        // A huge seq_lo at the start would belong to subspace -1: refused.
        assert_eq!(w.infer_esn(u32::MAX, true), None);
        // Case A near the end of subspace 0: a wrapped low number is subspace 1.
        w.advance(u64::from(u32::MAX) - 5);
        assert_eq!(w.infer_esn(2, true), Some((1 << 32) | 2));
        assert_eq!(
            w.infer_esn(u32::MAX - 10, true),
            Some(u64::from(u32::MAX) - 10)
        );
        // Case B just after the wrap: window straddles subspaces 0 and 1.
        w.advance((1 << 32) | 3);
        assert_eq!(
            w.infer_esn(u32::MAX - 2, true),
            Some(u64::from(u32::MAX) - 2)
        );
        assert_eq!(w.infer_esn(4, true), Some((1 << 32) | 4));
        // Without ESN the low bits are the whole number.
        assert_eq!(w.infer_esn(7, false), Some(7));
    }
}

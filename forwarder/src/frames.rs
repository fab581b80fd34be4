//! The queue of frames waiting to be written to the tap, with the pool their buffers come
//! from and return to, so steady-state traffic allocates nothing per frame.
//!
//! Shared by the engine's services and the flow modules (TCP segments, UDP datagrams), which
//! is why it is its own module: everything that emits toward the namespace goes through one
//! bounded queue, in order.

use std::collections::VecDeque;

/// Frames for the tap, and spare buffers.
#[derive(Debug, Default)]
pub struct Queue {
    frames: VecDeque<Vec<u8>>,
    pool: Vec<Vec<u8>>,
    big: Vec<Vec<u8>>,
    /// Frames refused because the queue was full.
    pub dropped: u64,
    /// Frames queued since start.
    pub queued: u64,
}

impl Queue {
    /// An empty buffer from the pool (or a new one).
    pub fn buffer(&mut self) -> Vec<u8> {
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.clear();
        buf
    }

    /// A buffer for a large data frame, from the pool of large buffers. Unlike
    /// [`Queue::buffer`] its length is left as it was: resizing it to a frame's length then
    /// writes zeros only beyond the old length, instead of over 64 KiB per segment (which
    /// profiling showed to be a quarter of the download path's CPU).
    pub fn data_buffer(&mut self) -> Vec<u8> {
        self.big.pop().unwrap_or_default()
    }

    /// Whether `n` more frames fit.
    #[must_use]
    pub fn has_room(&self, n: usize) -> bool {
        self.frames.len() + n <= MAX_QUEUED
    }

    /// Queues a frame; when the queue is full the frame is counted in `dropped` and its
    /// buffer returns to the pool.
    pub fn push(&mut self, frame: Vec<u8>) {
        if self.frames.len() >= MAX_QUEUED {
            self.dropped += 1;
            self.recycle(frame);
            return;
        }
        self.queued += 1;
        self.frames.push_back(frame);
    }

    /// The next frame to write.
    pub fn pop(&mut self) -> Option<Vec<u8>> {
        self.frames.pop_front()
    }

    /// Returns a buffer to the pool (large ones to the pool of large buffers).
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if buf.capacity() >= BIG {
            if self.big.len() < MAX_POOLED {
                self.big.push(buf);
            }
        } else if self.pool.len() < MAX_POOLED {
            self.pool.push(buf);
        }
    }

    /// Frames waiting.
    #[must_use]
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether no frame waits.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

/// Frames waiting for the shell beyond which new ones are dropped.
pub const MAX_QUEUED: usize = 4096;
/// Capacity from which a buffer belongs to the pool of large buffers.
pub const BIG: usize = 16 * 1024;
/// Buffers kept for reuse (per pool).
pub const MAX_POOLED: usize = 512;

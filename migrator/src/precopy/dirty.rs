//! A dirty bitmap: one bit per block.

#[derive(Debug, Clone)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
    count: u64,
}

impl Bitmap {
    pub fn new(len: u64) -> Self {
        Self {
            words: vec![0; len.div_ceil(64) as usize],
            len,
            count: 0,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Set bit `i`; returns true when it was clear before.
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let m = 1 << (i % 64);
        let was_clear = *w & m == 0;
        *w |= m;
        self.count += was_clear as u64;
        was_clear
    }

    /// Clear bit `i`; returns true when it was set before.
    pub fn clear(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let m = 1 << (i % 64);
        let was_set = *w & m != 0;
        *w &= !m;
        self.count -= was_set as u64;
        was_set
    }

    /// The lowest set bit.
    pub fn first_set(&self) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        self.words
            .iter()
            .position(|&w| w != 0)
            .map(|wi| wi as u64 * 64 + self.words[wi].trailing_zeros() as u64)
    }

    /// Indices of all set bits, ascending.
    pub fn ones(&self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.count as usize);
        for (wi, &w) in self.words.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let b = w.trailing_zeros() as u64;
                out.push(wi as u64 * 64 + b);
                w &= w - 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_a_set(ops in proptest::collection::vec((any::<bool>(), 0u64..200), 0..400)) {
            let mut b = Bitmap::new(150);
            let mut model = std::collections::BTreeSet::new();
            for (set, i) in ops {
                if set {
                    let fresh = b.set(i);
                    prop_assert_eq!(fresh, i < 150 && model.insert(i));
                } else {
                    let was = b.clear(i);
                    prop_assert_eq!(was, model.remove(&i));
                }
            }
            prop_assert_eq!(b.count(), model.len() as u64);
            prop_assert_eq!(b.ones(), model.into_iter().collect::<Vec<_>>());
        }
    }
}

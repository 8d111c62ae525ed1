//! Slab: values stored under small integer keys that are reused once freed, so a key can ride
//! in an SQE's user_data and find its value again in O(1).

pub struct Slab<T> {
    slots: Vec<Option<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    /// Stores `value` and returns its key.
    pub fn insert(&mut self, value: T) -> u32 {
        self.len += 1;
        match self.free.pop() {
            Some(key) => {
                self.slots[key as usize] = Some(value);
                key
            }
            None => {
                self.slots.push(Some(value));
                (self.slots.len() - 1) as u32
            }
        }
    }

    pub fn get(&self, key: u32) -> Option<&T> {
        self.slots.get(key as usize)?.as_ref()
    }

    /// Removes and returns the value under `key`, freeing the key for reuse.
    pub fn remove(&mut self, key: u32) -> Option<T> {
        let value = self.slots.get_mut(key as usize)?.take();
        if value.is_some() {
            self.free.push(key);
            self.len -= 1;
        }
        value
    }

    /// How many values are stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Forgets every value without dropping it: for memory the kernel may still use.
    pub fn leak(&mut self) {
        for value in self.slots.drain(..) {
            std::mem::forget(value);
        }
        self.free.clear();
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::Slab;

    #[test]
    fn keys_are_reused_and_len_counts() {
        let mut s = Slab::default();
        let a = s.insert("a");
        let b = s.insert("b");
        assert_eq!((s.len(), s.get(a), s.get(b)), (2, Some(&"a"), Some(&"b")));
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.remove(a), None);
        assert_eq!(s.len(), 1);
        assert_eq!(s.insert("c"), a);
        assert_eq!(s.get(99), None);
        s.leak();
        assert_eq!((s.len(), s.get(b)), (0, None));
    }
}

//! FdMap: a table keyed by file descriptor, stored as a Vec indexed by the fd number.
//!
//! The kernel hands out the lowest free fd, so the numbers in use are small and dense: a Vec
//! touches only as much memory as there are fds, where a hash table spreads its entries over
//! every page of its (up to twice oversized) bucket array.

pub struct FdMap<T> {
    slots: Vec<Option<T>>,
    len: usize,
}

impl<T> Default for FdMap<T> {
    fn default() -> Self {
        FdMap {
            slots: Vec::new(),
            len: 0,
        }
    }
}

/// The slot of `fd`; every fd reaching these tables came from the kernel or was checked
/// non-negative at the Python boundary.
fn index(fd: i32) -> usize {
    usize::try_from(fd).expect("file descriptors are never negative")
}

impl<T> FdMap<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn get(&self, fd: i32) -> Option<&T> {
        self.slots.get(index(fd))?.as_ref()
    }

    pub fn get_mut(&mut self, fd: i32) -> Option<&mut T> {
        self.slots.get_mut(index(fd))?.as_mut()
    }

    fn slot(&mut self, fd: i32) -> &mut Option<T> {
        let i = index(fd);
        if i >= self.slots.len() {
            self.slots.resize_with(i + 1, || None);
        }
        &mut self.slots[i]
    }

    /// Stores `value` for `fd`, returning what was there.
    pub fn insert(&mut self, fd: i32, value: T) -> Option<T> {
        let old = self.slot(fd).replace(value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn get_or_insert_with(&mut self, fd: i32, make: impl FnOnce() -> T) -> &mut T {
        if self.slot(fd).is_none() {
            self.len += 1;
        }
        self.slot(fd).get_or_insert_with(make)
    }

    pub fn remove(&mut self, fd: i32) -> Option<T> {
        let old = self.slots.get_mut(index(fd))?.take();
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    pub fn clear(&mut self) {
        self.slots.clear();
        self.len = 0;
    }

    /// The fds present, in ascending order.
    pub fn fds(&self) -> impl Iterator<Item = i32> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.is_some())
            .map(|(i, _)| i as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::FdMap;

    #[test]
    fn insert_get_remove_and_len() {
        let mut m = FdMap::default();
        assert_eq!(m.len(), 0);
        assert_eq!(m.insert(7, "a"), None);
        assert_eq!(m.insert(3, "b"), None);
        assert_eq!(m.insert(7, "c"), Some("a"));
        assert_eq!(m.len(), 2);
        assert_eq!(m.get(7), Some(&"c"));
        assert_eq!(m.get(4), None);
        assert_eq!(m.get(1000), None);
        assert_eq!(m.fds().collect::<Vec<_>>(), vec![3, 7]);
        assert_eq!(m.remove(3), Some("b"));
        assert_eq!(m.remove(3), None);
        assert_eq!(m.len(), 1);
        *m.get_or_insert_with(9, || "d") = "e";
        assert_eq!(m.get_or_insert_with(9, || "x"), &"e");
        assert_eq!(m.len(), 2);
        m.clear();
        assert!(m.len() == 0 && m.get(7).is_none());
    }
}

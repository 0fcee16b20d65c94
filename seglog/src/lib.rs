//! seglog

//! Range request semantics on top of "collect the visible key-values": limit, `more`, count,
//! sort, revision filters and keys-only, in the order etcd applies them.

use std::cmp::Ordering;

use oxcd_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use oxcd_proto::etcdserverpb::{RangeRequest, RangeResponse};
use oxcd_proto::mvccpb::KeyValue;

use crate::{header, KeyRange, MvccError};

/// `collect(range, limit, count_only)` returns the visible kvs (at most `limit`, 0 = all) and
/// the total number that matched. `view_rev` is the revision reported in the header.
pub(crate) fn respond(
    req: &RangeRequest,
    view_rev: i64,
    collect: impl FnOnce(KeyRange<'_>, usize, bool) -> Result<(Vec<KeyValue>, usize), MvccError>,
) -> Result<RangeResponse, MvccError> {
    let sort_order = SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None);
    let sort_target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
    let filtered = req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0;
    // Sorting or filtering needs everything first; otherwise one extra tells `more`.
    let fetch = if sort_order != SortOrder::None || filtered || req.limit <= 0 {
        0
    } else {
        req.limit as usize + 1
    };
    let (mut kvs, count) = collect(
        KeyRange::new(&req.key, &req.range_end),
        fetch,
        req.count_only,
    )?;

    if req.max_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision <= req.max_mod_revision);
    }
    if req.min_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision >= req.min_mod_revision);
    }
    if req.max_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision <= req.max_create_revision);
    }
    if req.min_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision >= req.min_create_revision);
    }

    // Results come in key order; a non-key target with no order still sorts ascending.
    let order = if sort_target != SortTarget::Key && sort_order == SortOrder::None {
        SortOrder::Ascend
    } else {
        sort_order
    };
    if order != SortOrder::None {
        let cmp = |a: &KeyValue, b: &KeyValue| -> Ordering {
            match sort_target {
                SortTarget::Key => a.key.cmp(&b.key),
                SortTarget::Version => a.version.cmp(&b.version),
                SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                SortTarget::Value => a.value.cmp(&b.value),
            }
        };
        // Stable, like etcd's: ties keep key order.
        if order == SortOrder::Descend {
            kvs.sort_by(|a, b| cmp(b, a));
        } else {
            kvs.sort_by(cmp);
        }
    }

    let mut more = false;
    if req.limit > 0 && kvs.len() > req.limit as usize {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResponse {
        header: header(view_rev),
        kvs,
        more,
        count: count as i64,
    })
}

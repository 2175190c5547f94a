use super::*;
use crate::change::Lsn;

/// Builds pgoutput messages the way the server writes them.
#[derive(Default)]
struct Msg(Vec<u8>);

impl Msg {
    fn tag(t: u8) -> Msg {
        Msg(vec![t])
    }
    fn u8(mut self, v: u8) -> Msg {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Msg {
        self.0.extend(v.to_be_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Msg {
        self.0.extend(v.to_be_bytes());
        self
    }
    fn str(mut self, s: &str) -> Msg {
        self.0.extend(s.as_bytes());
        self.0.push(0);
        self
    }
    fn text(self, s: &str) -> Msg {
        let mut m = self.u8(b't').u32(s.len() as u32);
        m.0.extend(s.as_bytes());
        m
    }
}

/// `shop.products(id int8 key, name text, active bool, price float8, blob bytea)`.
fn relation(oid: u32) -> Vec<u8> {
    let columns = [("id", 20, 1), ("name", 25, 0), ("active", 16, 0), ("price", 701, 0), ("blob", 17, 0)];
    let mut m = Msg::tag(b'R').u32(oid).str("shop").str("products").u8(b'd').u16(columns.len() as u16);
    for (name, oid, flags) in columns {
        m = m.u8(flags).str(name).u32(oid).u32(u32::MAX);
    }
    m.0
}

fn full_tuple(m: Msg, id: &str, name: &str) -> Msg {
    m.u16(5).text(id).text(name).text("t").text("12.5").text("\\x0aff")
}

fn tx() -> TxContext {
    TxContext { final_lsn: 100, xid: 7, commit_time_micros: 0 }
}

fn at() -> Position {
    Position::Postgres { commit_lsn: Lsn(100), lsn: Lsn(90) }
}

fn decoder() -> Decoder {
    let mut d = Decoder::new();
    assert!(d.decode(&relation(42), tx(), at()).unwrap().is_empty());
    d
}

#[test]
fn an_insert_is_typed_by_column_type() {
    let mut d = decoder();
    let msg = full_tuple(Msg::tag(b'I').u32(42).u8(b'N'), "9", "boots");
    let changes = d.decode(&msg.0, tx(), at()).unwrap();
    assert_eq!(changes.len(), 1);
    let c = &changes[0];
    assert_eq!((&*c.table, c.op), ("shop.products", Operation::Insert));
    assert_eq!(c.new_cell("id"), &Cell::Known(Value::Int(9)));
    assert_eq!(c.new_cell("name"), &Cell::Known(Value::Text("boots".into())));
    assert_eq!(c.new_cell("active"), &Cell::Known(Value::Bool(true)));
    assert_eq!(c.new_cell("price"), &Cell::Known(Value::Float(12.5)));
    assert_eq!(c.new_cell("blob"), &Cell::Known(Value::Bytes(vec![0x0a, 0xff])));
    assert_eq!(c.xid, Some(TransactionId::Postgres(7)));
    assert_eq!(c.commit_time_micros, Some(PG_EPOCH_OFFSET_MICROS));
}

#[test]
fn unchanged_toast_is_unknown_not_null() {
    let mut d = decoder();
    let msg = Msg::tag(b'U').u32(42).u8(b'N').u16(5).text("9").u8(b'u').u8(b'n').text("1").text("\\x00");
    let c = d.decode(&msg.0, tx(), at()).unwrap().remove(0);
    assert!(c.before.is_none(), "no old tuple under REPLICA IDENTITY DEFAULT");
    assert_eq!(c.new_cell("name"), &Cell::Unknown);
    assert_eq!(c.new_cell("active"), &Cell::Known(Value::Null));
}

#[test]
fn an_identity_only_old_tuple_leaves_other_columns_unknown() {
    let mut d = decoder();
    // Key update: `K` tuple with the old id; the server writes `n` for the rest.
    let old = Msg::tag(b'U').u32(42).u8(b'K').u16(5).text("8").u8(b'n').u8(b'n').u8(b'n').u8(b'n').u8(b'N');
    let msg = full_tuple(old, "9", "boots");
    let c = d.decode(&msg.0, tx(), at()).unwrap().remove(0);
    assert_eq!(c.old("id"), &Cell::Known(Value::Int(8)));
    assert_eq!(c.old("name"), &Cell::Unknown, "`n` in a K tuple is not a NULL");
    assert_eq!(c.new_cell("id"), &Cell::Known(Value::Int(9)));
}

#[test]
fn a_full_old_tuple_keeps_real_nulls() {
    let mut d = decoder();
    let old = Msg::tag(b'D').u32(42).u8(b'O').u16(5).text("9").u8(b'n').text("f").text("NaN").u8(b'n');
    let c = d.decode(&old.0, tx(), at()).unwrap().remove(0);
    assert_eq!(c.op, Operation::Delete);
    assert_eq!(c.old("name"), &Cell::Known(Value::Null));
    assert!(matches!(c.old("price"), Cell::Known(Value::Float(x)) if x.is_nan()));
}

#[test]
fn truncate_yields_one_change_per_table() {
    let mut d = decoder();
    let mut other = relation(43);
    other[5..9].copy_from_slice(b"misc");
    d.decode(&other, tx(), at()).unwrap();
    let msg = Msg::tag(b'T').u32(2).u8(0).u32(42).u32(43);
    let tables: Vec<String> = d.decode(&msg.0, tx(), at()).unwrap().iter().map(|c| c.table.to_string()).collect();
    assert_eq!(tables, ["shop.products", "misc.products"]);
}

#[test]
fn a_new_relation_message_replaces_the_old_schema() {
    let mut d = decoder();
    let renamed = Msg::tag(b'R').u32(42).str("shop").str("products").u8(b'f').u16(1).u8(1).str("sku").u32(25).u32(0);
    d.decode(&renamed.0, tx(), at()).unwrap();
    let msg = Msg::tag(b'I').u32(42).u8(b'N').u16(1).text("A-1");
    let c = d.decode(&msg.0, tx(), at()).unwrap().remove(0);
    assert_eq!(c.new_cell("sku"), &Cell::Known(Value::Text("A-1".into())));
    assert_eq!(c.new_cell("id"), &Cell::Unknown);
    assert_eq!(d.relation(42).map(|r| r.replica_identity), Some(b'f'));
}

#[test]
fn surprises_are_errors() {
    let mut d = decoder();
    assert_eq!(d.decode(&Msg::tag(b'I').u32(99).u8(b'N').u16(0).0, tx(), at()), Err(DecodeError::UnknownRelation(99)));
    assert_eq!(d.decode(b"Z", tx(), at()), Err(DecodeError::UnknownTag('Z')));
    assert!(matches!(d.decode(&Msg::tag(b'I').u32(42).0, tx(), at()), Err(DecodeError::Truncated { .. })));
    let too_wide = Msg::tag(b'I').u32(42).u8(b'N').u16(6);
    assert!(matches!(d.decode(&too_wide.0, tx(), at()), Err(DecodeError::Malformed { .. })));
    assert!(d.decode(&[], tx(), at()).is_err());
}

#[test]
fn values_that_do_not_parse_stay_text() {
    assert_eq!(typed(20, b"12x"), Value::Text("12x".into()));
    assert_eq!(typed(16, b"maybe"), Value::Text("maybe".into()));
    assert_eq!(typed(1700, b"12.50"), Value::Text("12.50".into()));
    assert_eq!(typed(17, b"\\xzz"), Value::Text("\\xzz".into()));
}

#[test]
fn a_relation_naming_a_column_twice_is_an_error() {
    let mut d = Decoder::new();
    let twice = Msg::tag(b'R').u32(7).str("shop").str("t").u8(b'd').u16(2).u8(1).str("id").u32(20).u32(0);
    let twice = twice.u8(0).str("id").u32(25).u32(0);
    assert!(matches!(d.decode(&twice.0, tx(), at()), Err(DecodeError::Malformed { tag: 'R', .. })));
    assert!(d.relation(7).is_none());
}

#[test]
fn text_that_is_not_utf8_is_kept_with_replacement_characters() {
    assert_eq!(typed(25, b"caf\xe9"), Value::Text("caf\u{fffd}".into()));
    assert_eq!(typed(25, "café".as_bytes()), Value::Text("café".into()));
}

#[test]
fn decode_into_appends_nothing_when_a_message_fails() {
    let mut d = decoder();
    let mut out = Vec::new();
    d.decode_into(&full_tuple(Msg::tag(b'I').u32(42).u8(b'N'), "1", "a").0, tx(), at(), &mut out).unwrap();
    assert_eq!(out.len(), 1);
    // A truncate of a described table and an undescribed one.
    let truncate = Msg::tag(b'T').u32(2).u8(0).u32(42).u32(99);
    assert_eq!(d.decode_into(&truncate.0, tx(), at(), &mut out), Err(DecodeError::UnknownRelation(99)));
    assert_eq!(out.len(), 1);
    let tuple_too_short = Msg::tag(b'I').u32(42).u8(b'N').u16(2).text("2");
    assert!(d.decode_into(&tuple_too_short.0, tx(), at(), &mut out).is_err());
    assert_eq!(out.len(), 1);
}

#[test]
fn rows_of_an_aliased_partition_carry_the_graph_tables_name() {
    // Known at start: by the name Postgres sends.
    let mut d = Decoder::with_aliases([("shop.products".to_owned(), Arc::from("shop.catalog"))]);
    d.decode(&relation(42), tx(), at()).unwrap();
    let msg = full_tuple(Msg::tag(b'I').u32(42).u8(b'N'), "9", "boots");
    assert_eq!(&*d.decode(&msg.0, tx(), at()).unwrap()[0].table, "shop.catalog");

    // Found while streaming: from then on, and when described again.
    let mut d = decoder();
    d.alias_relation(42, Arc::from("shop.catalog"));
    assert_eq!(&*d.decode(&msg.0, tx(), at()).unwrap()[0].table, "shop.catalog");
    d.decode(&relation(42), tx(), at()).unwrap();
    assert_eq!(&*d.decode(&msg.0, tx(), at()).unwrap()[0].table, "shop.catalog");
}

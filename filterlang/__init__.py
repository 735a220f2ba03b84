"""The filter language: operators' job filters and connections' event filters share it.

    destination = 'd1' AND state IN ('failed','waiting') AND attempts >= 3
        AND payload.event = 'Order Completed' AND created_at > '2026-11-01'

Grammar (keywords are case-insensitive, so are field names; document keys are not):

    filter     := or END
    or         := and ("OR" and)*
    and        := not ("AND" not)*
    not        := "NOT" not | "(" or ")" | predicate
    predicate  := field ( compare value | ["NOT"] "IN" "(" value ("," value)* ")"
                        | ["NOT"] "LIKE" string | "IS" ["NOT"] "NULL" )
    field      := name | document ("." key)+          key := name | digits | "quoted key"
    compare    := "=" | "!=" | "<>" | "<" | "<=" | ">" | ">="
    value      := 'string' | number | TRUE | FALSE | NULL     ('' inside a string is a quote)

Which names are fields and which are documents (followed by a path into JSON) is the use's
`Language`: jobs (`payload.<path>`, compiled to SQL by jobsdb.filters) or events
(`properties.<path>`, evaluated in memory by filterlang.events). Every rejection, syntax or
meaning, is one FilterError with the 1-based column and what was expected there.

A language, not Postgres access: nothing here imports a database driver, gRPC or relayq
(import-linter holds it), so ingest's evaluator and the admin's SQL compiler read the same
parser, and a reader finds the grammar in one place.

    nodes    the AST
    errors   FilterError and the rejections every compiler shares
    lexer    text -> tokens
    parser   tokens -> AST, for one Language
    events   the AST as closures over an event document (connection filters)
    like     SQL LIKE matching without backtracking
"""

-- Reference clinic schema, one copy per tenant database. There is no tenant_id
-- column anywhere: the database itself is the tenant boundary.
-- A migration that has shipped is never edited: add a new file.

-- Locations of one clinic group.
CREATE TABLE clinics (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    address     text,
    phone       text,
    timezone    text NOT NULL DEFAULT 'UTC',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX clinics_name_key ON clinics (lower(name));

CREATE TABLE staff (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    clinic_id   uuid REFERENCES clinics (id) ON DELETE SET NULL,
    full_name   text NOT NULL CHECK (length(full_name) BETWEEN 1 AND 200),
    role        text NOT NULL CHECK (role IN ('doctor', 'nurse', 'receptionist', 'admin', 'other')),
    email       text CHECK (email IS NULL OR email LIKE '%_@_%'),
    active      boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX staff_email_key ON staff (lower(email)) WHERE email IS NOT NULL;
CREATE INDEX staff_clinic_idx ON staff (clinic_id);

CREATE TABLE patients (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    full_name     text NOT NULL CHECK (length(full_name) BETWEEN 1 AND 200),
    date_of_birth date CHECK (date_of_birth IS NULL OR date_of_birth > '1880-01-01'),
    email         text CHECK (email IS NULL OR email LIKE '%_@_%'),
    phone         text,
    notes         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX patients_name_idx ON patients (lower(full_name));

CREATE TABLE appointments (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    clinic_id   uuid NOT NULL REFERENCES clinics (id) ON DELETE RESTRICT,
    patient_id  uuid NOT NULL REFERENCES patients (id) ON DELETE RESTRICT,
    staff_id    uuid REFERENCES staff (id) ON DELETE SET NULL,
    starts_at   timestamptz NOT NULL,
    ends_at     timestamptz NOT NULL,
    status      text NOT NULL DEFAULT 'scheduled'
                CHECK (status IN ('scheduled', 'checked_in', 'completed', 'cancelled', 'no_show')),
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT appointments_ends_after_start CHECK (ends_at > starts_at)
);
CREATE INDEX appointments_starts_idx ON appointments (starts_at, id);
CREATE INDEX appointments_patient_idx ON appointments (patient_id, starts_at);
CREATE INDEX appointments_staff_idx ON appointments (staff_id, starts_at);

CREATE TABLE invoices (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    patient_id     uuid NOT NULL REFERENCES patients (id) ON DELETE RESTRICT,
    appointment_id uuid REFERENCES appointments (id) ON DELETE SET NULL,
    number         text NOT NULL CONSTRAINT invoices_number_key UNIQUE,
    amount_cents   bigint NOT NULL CHECK (amount_cents >= 0),
    currency       char(3) NOT NULL DEFAULT 'EUR' CHECK (currency ~ '^[A-Z]{3}$'),
    status         text NOT NULL DEFAULT 'open' CHECK (status IN ('draft', 'open', 'paid', 'void')),
    issued_at      timestamptz NOT NULL DEFAULT now(),
    due_at         timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX invoices_patient_idx ON invoices (patient_id);

CREATE TABLE payments (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    invoice_id    uuid NOT NULL REFERENCES invoices (id) ON DELETE RESTRICT,
    amount_cents  bigint NOT NULL CHECK (amount_cents > 0),
    method        text NOT NULL CHECK (method IN ('cash', 'card', 'transfer', 'insurance')),
    paid_at       timestamptz NOT NULL DEFAULT now(),
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payments_invoice_idx ON payments (invoice_id);
